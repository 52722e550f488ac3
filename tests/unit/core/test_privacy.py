"""The RDP accountant against dp_accounting and published tables; the ledger: budget, composition, retries."""

from __future__ import annotations

import json
import math
import os
import stat
from datetime import UTC, datetime

import numpy as np
import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.privacy import BudgetExceeded, Charge, PrivacyBudget, PrivacyLedger

# eps of SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps) from
# dp_accounting 0.6.0's RdpAccountant().compose(event).get_epsilon(delta), computed directly (Python 3.11,
# in a separate venv: dp_accounting pins attrs<24, Airflow's task SDK needs attrs>=24.2, so it cannot be
# installed beside the product; these golden values are the comparison):
DP_ACCOUNTING_0_6_0 = [
    # (sigma, q, steps, delta, eps)
    (1.1, 0.01, 10_000, 1e-5, 5.632010670081592),
    (4.0, 0.01, 10_000, 1e-5, 1.0354900660362436),
    (1.1, 256 / 60_000, 14_062, 1e-5, 2.5965558697943036),
    (0.7, 250 / 60_000, 10_800, 1e-5, 6.234250492833798),
    (1.0, 0.02, 500, 1e-6, 3.6025880872881686),
    (2.0, 0.001, 3_000, 1e-5, 0.14667000946678113),
]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "expected"), DP_ACCOUNTING_0_6_0)
def test_epsilon_matches_dp_accounting_values(sigma, q, steps, delta, expected):
    assert privacy.epsilon_spent(sigma, q, steps, delta) == pytest.approx(expected, rel=1e-9)


def _classic_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Mironov 2017's conversion (Prop. 3), eps = min_alpha RDP(alpha) - log(delta)/(alpha-1), on TF Privacy's
    old order grid: what compute_dp_sgd_privacy printed when the tables below were published."""
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = privacy.rdp_curve(sigma, q, steps, orders=tuple(orders))
    return float(np.min(rdp - math.log(delta) / (orders - 1)))


@pytest.mark.parametrize(
    ("sigma", "epochs", "published"),
    # tensorflow/privacy tutorials/README.md, "Select Parameters": MNIST, N = 60,000, batch 256, delta = 1e-5
    [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)],
)
def test_rdp_curve_reproduces_tf_privacy_mnist_table(sigma, epochs, published):
    q, steps = 256 / 60_000, int(epochs * 60_000 / 256)
    assert _classic_epsilon(sigma, q, steps, 1e-5) == pytest.approx(published, abs=0.005)
    # the conversion we report (Canonne-Kamath-Steinke) is tighter than the classic one, never looser
    assert privacy.epsilon_spent(sigma, q, steps, 1e-5) < published


def test_abadi_et_al_moments_accountant_example():
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10,000 gives eps ~ 1.26 with the
    # moments accountant
    assert _classic_epsilon(4.0, 0.01, 10_000, 1e-5) == pytest.approx(1.26, abs=0.005)
    assert 0.9 < privacy.epsilon_spent(4.0, 0.01, 10_000, 1e-5) < 1.26


def test_edge_cases():
    assert privacy.epsilon_spent(1.0, 0.01, 0, 1e-5) == 0.0
    assert privacy.epsilon_spent(1.0, 0.0, 100, 1e-5) == 0.0
    assert math.isinf(privacy.epsilon_spent(0.0, 0.01, 1, 1e-5))
    # full batch: the Gaussian mechanism's RDP is alpha/(2sigma^2) per step
    rdp = privacy.rdp_curve(2.0, 1.0, 3)
    assert rdp == pytest.approx(3 * np.array(privacy.DEFAULT_ORDERS) / 8)
    assert privacy.epsilon_spent(1.1, 0.01, 1000, 1e-5) < privacy.epsilon_spent(1.1, 0.01, 2000, 1e-5)
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.epsilon_spent(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon_spent(1.0, 0.1, 10, 1.0)


def _charge(run: str = "run-1", rnd: int = 1, steps: int = 5_000, **kw) -> Charge:
    fields = {"dataset": "patients", "noise_multiplier": 1.1, "sampling_rate": 0.01} | kw
    return Charge(run_id=run, round=rnd, steps=steps, **fields)


def _ledger(epsilon: float = 8.0, delta: float = 1e-5, **kw) -> PrivacyLedger:
    return PrivacyLedger(budget=PrivacyBudget(epsilon=epsilon, delta=delta, **kw))


def test_two_runs_compose_like_one_run_with_the_summed_steps():
    ledger = privacy.charge(privacy.charge(_ledger(), _charge("a", steps=3_000)), _charge("b", steps=7_000))
    assert privacy.spent(ledger) == pytest.approx(privacy.epsilon_spent(1.1, 0.01, 10_000, 1e-5), rel=1e-12)
    # and composition is tighter than adding the runs' eps's
    assert privacy.spent(ledger) < privacy.epsilon_spent(1.1, 0.01, 3_000, 1e-5) + privacy.epsilon_spent(
        1.1, 0.01, 7_000, 1e-5
    )


def test_heterogeneous_charges_add_rdp_curves():
    charges = [_charge("a", steps=2_000), _charge("b", steps=500, noise_multiplier=2.0, sampling_rate=0.05)]
    rdp = privacy.rdp_curve(1.1, 0.01, 2_000) + privacy.rdp_curve(2.0, 0.05, 500)
    expected = privacy.rdp_to_epsilon(privacy.DEFAULT_ORDERS, rdp, 1e-5)[0]
    assert privacy.epsilon_of(charges, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_a_job_over_budget_is_refused_with_the_remaining_budget_in_the_message():
    ledger = privacy.charge(_ledger(epsilon=5.0), _charge("a", steps=5_000))
    spent = privacy.spent(ledger)
    assert spent == pytest.approx(3.847, abs=1e-3)
    assert privacy.remaining(ledger) == pytest.approx(5.0 - spent)
    big = _charge("b", steps=5_000)
    with pytest.raises(
        BudgetExceeded, match=r"spent eps=3\.847, remaining eps=1\.153 of 5 at delta=1e-05"
    ) as info:
        privacy.check_job(ledger, big)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.job == pytest.approx(3.847, abs=1e-3)
    assert err.total == pytest.approx(5.632, abs=1e-3)
    assert "costs eps=3.847 alone and would bring the total to eps=5.632" in str(err)
    with pytest.raises(BudgetExceeded):
        privacy.charge(ledger, big)
    privacy.check_job(ledger, _charge("b", steps=500))  # a small job still fits


def test_charging_is_idempotent_per_run_and_round():
    ledger = privacy.charge(_ledger(), _charge("a", 1))
    again = privacy.charge(ledger, _charge("a", 1))  # a retried task: a later timestamp, same job
    assert again.entries == ledger.entries
    assert privacy.spent(again) == privacy.spent(ledger)
    nxt = privacy.charge(again, _charge("a", 2))
    assert len(nxt.entries) == 2
    with pytest.raises(ValueError, match="already charged with different parameters"):
        privacy.charge(nxt, _charge("a", 2, steps=6_000))
    # an exhausted budget still accepts the retry of a charge it already holds
    full = PrivacyLedger(budget=PrivacyBudget(epsilon=3.9, delta=1e-5), entries=[_charge("a", 1)])
    assert privacy.remaining(full) < 0.1
    assert privacy.charge(full, _charge("a", 1)) == full


def test_shuffled_batches_need_the_budget_to_accept_them():
    shuffled = _charge(sampling="shuffle")
    with pytest.raises(ValueError, match="Poisson sampling only"):
        privacy.check_job(_ledger(), shuffled)
    assert privacy.charge(_ledger(accept_shuffled=True), shuffled).entries == [shuffled]


def test_ledger_schema_refuses_duplicate_keys_and_unknown_fields():
    with pytest.raises(ValueError, match="twice"):
        PrivacyLedger(budget=PrivacyBudget(epsilon=1, delta=1e-5), entries=[_charge("a", 1), _charge("a", 1)])
    with pytest.raises(ValueError, match="schema_version"):
        PrivacyLedger.model_validate({"schema_version": 2, "budget": {"epsilon": 1, "delta": 1e-5}})
    with pytest.raises(ValueError):
        _charge(noise_multiplier=0.0)


def test_ledger_file_round_trip_is_atomic_and_private(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ledger = privacy.charge(_ledger(), _charge("a", 1, timestamp=ts))
    privacy.save_ledger(path, ledger)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["schema_version"] == 1
    assert privacy.load_ledger(path) == ledger
    privacy.save_ledger(path, privacy.charge(ledger, _charge("a", 2)))
    assert len(privacy.load_ledger(path).entries) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy-ledger.json"]  # no temp file left


# ------------------------------------------------------------------------------------- jobs and run summary


def test_the_planned_charge_is_the_schedule_of_plain_training_and_the_accountants_epsilon():
    from lepton_tasks.core.messages import DPTraining

    assert privacy.dp_schedule(1000, 64, 3) == (0.064, 3 * 16)
    assert privacy.dp_schedule(10, 64, 2) == (1.0, 2)  # a batch larger than the data: q = 1
    with pytest.raises(ValueError, match="n >= 1"):
        privacy.dp_schedule(0, 64, 1)
    c = privacy.planned_charge(DPTraining(noise_multiplier=1.1, l2_clip=0.5, delta=1e-6), 6400, 64, 100)
    assert (c.sampling_rate, c.steps, c.sampling, c.l2_clip, c.delta) == (0.01, 10_000, "poisson", 0.5, 1e-6)
    assert c.epsilon_this_update == privacy.epsilon_spent(1.1, 0.01, 10_000, 1e-6)
    entry = privacy.ledger_charge(c, run_id="r", round=3, dataset="banks")
    assert entry.key == ("r", 3) and (entry.noise_multiplier, entry.sampling_rate, entry.steps) == (
        1.1,
        0.01,
        10_000,
    )


def test_budget_status_reports_the_composed_total_and_what_remains():
    ledger = privacy.charge(privacy.charge(_ledger(epsilon=8.0), _charge("a", 1)), _charge("a", 2))
    status = privacy.budget_status(ledger, "banks")
    assert status.ledger == "banks" and status.epsilon_limit == 8.0 and status.delta == 1e-5
    assert status.epsilon_spent == pytest.approx(privacy.spent(ledger))
    assert status.epsilon_remaining == pytest.approx(8.0 - privacy.spent(ledger))
    full = privacy.budget_status(
        PrivacyLedger(budget=PrivacyBudget(epsilon=1, delta=1e-5), entries=[_charge("a", 1)]), "*"
    )
    assert full.epsilon_remaining == 0.0  # never negative


def test_run_privacy_composes_each_sites_charges_of_the_run():
    from lepton_tasks.core.messages import DPTraining, RoundAnswer

    dp = DPTraining(noise_multiplier=1.1, l2_clip=1.0, delta=1e-5)
    c1 = privacy.planned_charge(dp, 6400, 64, 50)
    c2 = privacy.planned_charge(dp, 3200, 64, 50)
    ledger = privacy.charge(_ledger(epsilon=8.0), privacy.ledger_charge(c1, run_id="r", round=1, dataset="d"))
    status = privacy.budget_status(ledger, "d")
    answers = {
        "a": [
            RoundAnswer(mode="train", n_samples=1, privacy=c1),
            RoundAnswer(mode="train", n_samples=1, privacy=c1),
        ],
        "b": [RoundAnswer(mode="train", n_samples=1, privacy=c2, budget=status)],
        "c": [RoundAnswer(mode="train", n_samples=1)],  # no DP at this site: not listed
    }
    run = privacy.run_privacy(answers, dp=dp, secure_aggregation=False, dropouts_recovered=3)
    assert run.dropouts_recovered is None  # no secure aggregation: nothing to recover
    assert sorted(run.sites) == ["a", "b"]
    a, b = run.sites["a"], run.sites["b"]
    assert (
        a.rounds_charged == 2 and a.epsilon_limit is None and a.noise_multiplier == 1.1 and a.l2_clip == 1.0
    )
    assert a.epsilon_run == pytest.approx(privacy.epsilon_spent(1.1, 0.01, 2 * 5000, 1e-5))  # composed
    assert a.epsilon_run < 2 * c1.epsilon_this_update  # not summed
    assert b.epsilon_run == pytest.approx(c2.epsilon_this_update)
    assert (b.epsilon_limit, b.epsilon_spent, b.epsilon_remaining) == (
        8.0,
        status.epsilon_spent,
        status.epsilon_remaining,
    )
    secured = privacy.run_privacy({}, dp=None, secure_aggregation=True, dropouts_recovered=1)
    assert secured.dropouts_recovered == 1 and secured.dp is None and secured.sites == {}
