"""The coordinator warns when a DP run's merged held-out metrics are dominated by the evaluation's noise
(``federation.publish.evaluation_noise_warning``): banks' 67 held-out positives against noise of sd 57."""

from __future__ import annotations

import pytest

from lepton_tasks.federation.publish import evaluation_noise_warning


def _block(sigma: float = 4.045, bins: int = 66) -> dict[str, object]:
    return {"auc": 0.9, "dp": {"mechanism": "gaussian", "noise_multiplier": sigma, "bins_per_class": bins}}


def test_banks_sized_holdouts_under_the_default_evaluation_epsilon_are_flagged():
    sites = {s: _block() for s in ("bank-a", "bank-b", "bank-c")}
    warning = evaluation_noise_warning(sites, {"n": 1965, "positives": 67})
    assert warning is not None
    assert "count is 67" in warning and "sd 57" in warning and "3 noisy histograms" in warning


@pytest.mark.parametrize("overall", [{"n": 1965, "positives": None}, {"auc": None}])
def test_an_undefined_class_total_is_flagged(overall):
    warning = evaluation_noise_warning({"a": _block()}, overall)
    assert warning is not None and "count is undefined" in warning


def test_enough_held_out_rows_in_both_classes_are_not_flagged():
    # sd = 4.045 * sqrt(66 * 3) = 57; 4 sd = 228 rows in the smaller class is enough
    sites = {s: _block() for s in ("a", "b", "c")}
    assert evaluation_noise_warning(sites, {"n": 10_000, "positives": 229}) is None
    assert evaluation_noise_warning(sites, {"n": 10_000, "positives": 227}) is not None
    assert evaluation_noise_warning(sites, {"n": 10_000, "positives": 9_800}) is not None  # negatives few


def test_a_run_without_noisy_histograms_is_never_flagged():
    exact = {"a": {"auc": 0.9}, "b": {"auc": 0.8, "dp": None}}
    assert evaluation_noise_warning(exact, {"n": 10, "positives": 1}) is None
