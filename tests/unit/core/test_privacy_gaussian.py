"""Gaussian releases besides DP-SGD (the evaluation round's histogram): their ledger charge composes with the
DP-SGD charges exactly as dp_accounting composes the same events, the ledger refuses one over budget, and the
noise is applied to every cell, from a secret source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.privacy import BudgetExceeded, Charge, PrivacyBudget, PrivacyLedger

# dp_accounting 0.6.0, RdpAccountant() composing the events below, .get_epsilon(1e-5); computed directly in a
# separate venv (dp_accounting pins attrs<24, Airflow's task SDK needs attrs>=24.2: see test_privacy.py):
#   sgd(s, q, t) = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(s)), t)
DP_ACCOUNTING_0_6_0 = [
    # (DP-SGD entries as (sigma, q, steps), Gaussian release sigma, eps)
    ([], 1.0, 4.728507067217623),
    ([], 5.0, 0.794522032537103),
    ([(1.0, 32 / 1200, 38)], 1.0, 4.896165527574556),
    ([(1.0, 32 / 1200, 38), (1.0, 32 / 1200, 38)], 1.0, 5.053923660218687),
    ([(2.0, 0.01, 1000)], 2.0, 2.301941299857453),
]
DELTA = 1e-5


def _ledger(sgd: list[tuple[float, float, int]], epsilon: float = 100.0) -> PrivacyLedger:
    entries = [
        Charge(run_id="r", round=k + 1, dataset="banks", noise_multiplier=s, sampling_rate=q, steps=t)
        for k, (s, q, t) in enumerate(sgd)
    ]
    return PrivacyLedger(budget=PrivacyBudget(epsilon=epsilon, delta=DELTA), entries=entries)


@pytest.mark.parametrize(("sgd", "sigma", "expected"), DP_ACCOUNTING_0_6_0)
def test_an_evaluation_charge_composes_with_dp_sgd_as_dp_accounting_does(sgd, sigma, expected):
    ledger = _ledger(sgd)
    entry = privacy.gaussian_charge(sigma, run_id="r", round=len(sgd) + 1, dataset="banks")
    assert (entry.sampling_rate, entry.steps, entry.release) == (1.0, 1, "evaluation")
    after = privacy.charge(ledger, entry)
    assert privacy.spent(after) == pytest.approx(expected, rel=1e-9)
    assert privacy.spent(after) > privacy.spent(ledger)


def test_the_answers_report_of_a_gaussian_release_is_its_own_epsilon():
    cost = privacy.gaussian_privacy_charge(1.0, DELTA)
    assert (cost.sampling_rate, cost.steps, cost.l2_clip) == (1.0, 1, 1.0)
    assert cost.epsilon_this_update == pytest.approx(4.728507067217623, rel=1e-9)


def test_an_evaluation_over_budget_is_refused_with_the_ledgers_numbers():
    ledger = _ledger([(1.0, 32 / 1200, 38)], epsilon=4.8)  # eps 4.90 with the release
    entry = privacy.gaussian_charge(1.0, run_id="r", round=2, dataset="banks")
    with pytest.raises(BudgetExceeded) as err:
        privacy.check_job(ledger, entry)
    assert err.value.total == pytest.approx(4.896165527574556, rel=1e-9)
    assert err.value.job == pytest.approx(4.728507067217623, rel=1e-9)
    assert err.value.remaining == pytest.approx(4.8 - privacy.spent(ledger))
    with pytest.raises(BudgetExceeded):
        privacy.charge(ledger, entry)


def test_an_old_ledger_without_a_release_field_reads_as_updates():
    raw = _ledger([(1.0, 0.1, 5)]).model_dump(mode="json")
    for e in raw["entries"]:
        del e["release"]
    assert PrivacyLedger.model_validate(raw).entries[0].release == "update"


# ------------------------------------------------------------------------------------------------ noise


def test_noise_lands_on_every_cell_and_is_unbiased():
    exact = np.full(4000, 50, np.int64)
    noisy = privacy.noisy_counts(exact, 2.0)
    assert noisy.dtype == np.int64 and noisy.shape == exact.shape
    diff = noisy - exact
    assert np.mean(diff != 0) > 0.7  # P(round(N(0, 4)) = 0) = 0.20
    assert abs(float(diff.mean())) < 6 * 2.0 / math.sqrt(exact.size)  # unbiased, within 6 standard errors
    assert float(diff.std()) == pytest.approx(math.sqrt(4 + 1 / 12), rel=0.1)  # sigma plus the rounding


def test_empty_cells_get_noise_too_and_stay_unbiased_signed_not_clamped():
    noisy = privacy.noisy_counts(np.zeros(4000, np.int64), 1.0)
    assert 0.2 < float(np.mean(noisy > 0)) < 0.4  # P(N(0, 1) >= 0.5) = 0.31
    assert 0.2 < float(np.mean(noisy < 0)) < 0.4  # and as many below 0: no clamp
    # unbiased at 0 too: clamping would add E[max(0, rint(N(0, 1)))] = 0.38 per cell (23 standard errors)
    assert abs(float(noisy.mean())) < 6 * math.sqrt(1 + 1 / 12) / math.sqrt(noisy.size)


def test_the_noise_is_fresh_on_every_call():
    """No seed: two releases of the same counts differ (the chance they agree on 1,000 cells is nil)."""
    exact = np.arange(1000, dtype=np.int64) + 100
    assert not np.array_equal(privacy.noisy_counts(exact, 1.0), privacy.noisy_counts(exact, 1.0))


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_a_noise_multiplier_must_be_positive_and_finite(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.noisy_counts(np.zeros(3), sigma)
