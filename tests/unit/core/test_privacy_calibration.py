"""The evaluation release's sigma is calibrated from the run's evaluation epsilon: the smallest sigma whose
one Gaussian release costs at most that epsilon by the ledger's own accountant (``core.privacy``)."""

from __future__ import annotations

import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.messages import DPTraining

DELTA = 1e-5


@pytest.mark.parametrize("epsilon", [0.001, 0.1, 0.5, 1.0, 2.0, 8.0, 50.0])
def test_the_sigma_is_the_smallest_whose_one_release_fits_the_epsilon(epsilon):
    sigma = privacy.gaussian_sigma_for_epsilon(epsilon, DELTA)
    assert privacy.epsilon_spent(sigma, 1.0, 1, DELTA) <= epsilon
    assert privacy.epsilon_spent(sigma * (1 - 1e-6), 1.0, 1, DELTA) > epsilon  # a smaller one would not


def test_it_inverts_the_accountant_at_sigma_one():
    """sigma = 1 costs eps = 4.7285 at delta = 1e-5 (pinned to dp_accounting in test_privacy_gaussian.py)."""
    eps = privacy.epsilon_spent(1.0, 1.0, 1, DELTA)
    assert privacy.gaussian_sigma_for_epsilon(eps, DELTA) == pytest.approx(1.0, rel=1e-6)


def test_the_default_evaluation_epsilon_gives_sigma_4_05_and_the_ledger_charges_at_most_it():
    dp = DPTraining(noise_multiplier=1.0, delta=DELTA)
    assert dp.evaluation_epsilon == 1.0
    sigma = privacy.evaluation_sigma(dp)
    assert sigma == pytest.approx(4.0454, abs=1e-4)
    entry = privacy.evaluation_charge(dp, run_id="run-1", rounds=5, dataset="banks")
    assert entry.key == ("run-1", 6) and entry.release == "evaluation" and entry.noise_multiplier == sigma
    assert privacy.epsilon_of([entry], DELTA) <= 1.0


def test_a_smaller_epsilon_needs_more_noise():
    sigmas = [privacy.gaussian_sigma_for_epsilon(e, DELTA) for e in (0.5, 1.0, 2.0, 4.0)]
    assert sigmas == sorted(sigmas, reverse=True)


@pytest.mark.parametrize(
    ("epsilon", "delta", "match"),
    [
        (0.0, DELTA, "epsilon must be a finite number > 0"),
        (float("inf"), DELTA, "epsilon must be a finite number > 0"),
        (1.0, 0.0, "delta must be in"),
    ],
)
def test_an_epsilon_that_cannot_be_calibrated_is_refused_naming_why(epsilon, delta, match):
    with pytest.raises(ValueError, match=match):
        privacy.gaussian_sigma_for_epsilon(epsilon, delta)


def test_the_run_declares_a_positive_evaluation_epsilon():
    with pytest.raises(ValueError, match="evaluation_epsilon"):
        DPTraining(noise_multiplier=1.0, evaluation_epsilon=0)
