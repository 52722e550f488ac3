"""Binary metrics per partner and overall (pooled, weighted, histogram-merged)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from lepton_tasks.core import metrics as evaluate

Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


def test_binary_metrics_hand_checked():
    m = evaluate.binary_metrics(Y, P)
    # pairs (pos, neg): (.35,.1) ok, (.35,.4) wrong, (.8,.1) ok, (.8,.4) ok → 3/4
    assert m["auc"] == pytest.approx(0.75)
    # ranking .8(+) .4(-) .35(+) .1(-): AP = 1/2·1 + 1/2·2/3
    assert m["pr_auc"] == pytest.approx(1 / 2 + 1 / 3)
    assert m["accuracy"] == pytest.approx(0.75)  # only 0.35 is misclassified at 0.5
    hand = -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    assert m["log_loss"] == pytest.approx(hand)
    assert (m["n"], m["positives"], m["positive_rate"], m["notes"]) == (4, 2, 0.5, [])
    json.dumps(m)


def test_binary_metrics_match_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.random(500) * 0.6 + y * 0.3, 0, 1)
    p[:3] = [0.0, 1.0, 1.0]  # clipping of log-loss at the extremes
    m = evaluate.binary_metrics(y, p)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["log_loss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    assert m["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_none_with_a_note(label):
    m = evaluate.binary_metrics([label] * 3, [0.2, 0.7, 0.9])
    assert m["auc"] is None and m["pr_auc"] is None
    assert "one class" in m["notes"][0]
    assert m["n"] == 3 and m["accuracy"] is not None and m["log_loss"] > 0


def test_empty_and_invalid_inputs():
    m = evaluate.binary_metrics([], [])
    assert m["n"] == 0 and m["auc"] is None and m["notes"] == ["no samples"]
    with pytest.raises(ValueError, match="3 values but y_prob has 2"):
        evaluate.binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        evaluate.binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        evaluate.binary_metrics([0, 1], [np.nan, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate.binary_metrics([0, 1], [0.1, 1.2])


def test_pooled_is_the_metric_of_the_concatenation():
    a = ([0, 1, 1], [0.2, 0.9, 0.4])
    b = ([0, 0, 1], [0.6, 0.1, 0.7])
    pooled = evaluate.pooled_metrics([a, b])
    direct = evaluate.binary_metrics(a[0] + b[0], a[1] + b[1])
    assert pooled["method"] == "pooled"
    assert {k: pooled[k] for k in evaluate.METRIC_KEYS} == {k: direct[k] for k in evaluate.METRIC_KEYS}
    assert evaluate.pooled_metrics([])["n"] == 0


def test_weighted_overall_hand_checked():
    per = {
        "a": {"n": 100, "positives": 10, "accuracy": 0.9, "log_loss": 0.3, "auc": 0.8, "pr_auc": 0.5},
        "b": {"n": 300, "positives": 30, "accuracy": 0.7, "log_loss": 0.5, "auc": 0.6, "pr_auc": 0.3},
        "c": {"n": 50, "positives": 0, "accuracy": 1.0, "log_loss": 0.1, "auc": None, "pr_auc": None},
    }
    m = evaluate.weighted_overall(per)
    assert m["n"] == 450 and m["positives"] == 40 and m["partners"] == 3
    assert m["accuracy"] == pytest.approx((90 + 210 + 50) / 450)
    assert m["log_loss"] == pytest.approx((30 + 150 + 5) / 450)
    assert m["auc_weighted_mean"] == pytest.approx((80 + 180) / 400)  # c has no AUC: left out
    assert m["pr_auc_weighted_mean"] == pytest.approx((50 + 90) / 400)
    assert "auc" not in m and m["notes"]
    with pytest.raises(ValueError, match="'n'"):
        evaluate.weighted_overall({"x": {"accuracy": 1.0}})


def test_score_summaries_merge_to_the_pooled_metrics_without_rows():
    rng = np.random.default_rng(2)
    parts = []
    for n, shift in ((400, 0.5), (900, 1.5), (250, -0.5)):
        y = (rng.random(n) < 0.15).astype(int)
        logit = rng.normal(size=n) + 1.2 * y + shift
        parts.append((y, 1 / (1 + np.exp(-logit))))
    summaries = [evaluate.score_summary(y, p) for y, p in parts]
    json.dumps(summaries)  # shareable as-is (XCom, JSON file)
    merged = evaluate.merge_score_summaries(json.loads(json.dumps(summaries)))
    pooled = evaluate.pooled_metrics(parts)
    assert merged["n"] == pooled["n"] and merged["positives"] == pooled["positives"]
    assert merged["auc"] == pytest.approx(pooled["auc"], abs=2e-3)
    assert merged["pr_auc"] == pytest.approx(pooled["pr_auc"], abs=1e-2)
    assert merged["accuracy"] == pytest.approx(pooled["accuracy"])
    assert merged["log_loss"] == pytest.approx(pooled["log_loss"])
    assert merged["partners"] == 3 and merged["method"] == "score-histogram"


def test_score_summary_exact_when_scores_fall_in_distinct_bins():
    m = evaluate.merge_score_summaries(
        [evaluate.score_summary(Y[:2], P[:2]), evaluate.score_summary(Y[2:], P[2:])]
    )
    assert m["auc"] == pytest.approx(0.75) and m["pr_auc"] == pytest.approx(1 / 2 + 1 / 3)


def test_score_summary_single_class_and_inconsistent_input():
    m = evaluate.merge_score_summaries([evaluate.score_summary([0, 0], [0.1, 0.2])])
    assert m["auc"] is None and m["notes"]
    bad = evaluate.score_summary([0, 1], [0.1, 0.9])
    bad["positives"] = 2
    with pytest.raises(ValueError, match="inconsistent"):
        evaluate.merge_score_summaries([bad])
    with pytest.raises(ValueError, match="incompatible"):
        evaluate.merge_score_summaries([{**bad, "bins": 10}])


def _counts(pairs: dict[int, int]) -> np.ndarray:
    out = np.zeros(evaluate.N_BINS, np.int64)
    for i, c in pairs.items():
        out[i] = c
    return out


def test_only_a_noisy_summary_holds_negative_counts_and_it_merges_signed():
    pos, neg = _counts({1500: 30, 1600: 10, 2000: -3}), _counts({100: -2, 600: 50, 1500: 5})
    with pytest.raises(ValueError, match=">= 0"):
        evaluate.summary_from_counts(pos, neg)
    noisy = evaluate.summary_from_counts(pos, neg, noisy=True)
    assert noisy["noisy"] is True and [2000, -3] in noisy["pos"] and [100, -2] in noisy["neg"]
    assert (noisy["n"], noisy["positives"]) == (90, 37)  # the signed sums: nothing clamped
    exact = evaluate.summary_from_counts(np.maximum(pos, 0), np.maximum(neg, 0))
    assert "noisy" not in exact
    # an exact summary with a negative count is refused; the noisy one merges with exact ones, signed
    with pytest.raises(ValueError, match="not a noisy release"):
        evaluate.merge_score_summaries([{**noisy, "noisy": False}])
    merged = evaluate.merge_score_summaries([noisy, exact])
    assert (merged["n"], merged["positives"]) == (90 + 95, 37 + 40)
    # pairs: 37 x 53 of the noisy histogram, signed; the same pairs in bin 1500 count half
    auc_noisy = (30 * 48 + 10 * 53 - 3 * 53 + 0.5 * 30 * 5) / (37 * 53)
    assert evaluate.merge_score_summaries([noisy])["auc"] == pytest.approx(auc_noisy)


def test_metrics_of_signed_counts_are_clipped_and_undefined_below_zero_totals():
    # more negative than positive mass above the negatives: a raw AUC below 0 reads 0
    below = evaluate.summary_from_counts(_counts({100: 10, 2000: -4}), _counts({1000: 20}), noisy=True)
    m = evaluate.merge_score_summaries([below])
    assert m["auc"] == 0.0 and 0.0 <= m["pr_auc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
    # a class total <= 0: no AUC/PR-AUC (noted), positives read within [0, n]
    none_pos = evaluate.summary_from_counts(_counts({1500: 2, 1600: -5}), _counts({600: 40}), noisy=True)
    m = evaluate.merge_score_summaries([none_pos])
    assert m["auc"] is None and m["pr_auc"] is None and "noisy total" in m["notes"][0]
    assert m["n"] == 37 and m["positives"] == 0 and m["positive_rate"] == 0.0 and m["log_loss"] >= 0.0
    # a total <= 0: no metric at all, n reads 0
    empty = evaluate.summary_from_counts(_counts({1500: 2}), _counts({600: -9}), noisy=True)
    m = evaluate.merge_score_summaries([empty])
    assert m["n"] == 0 and m["auc"] is None and m["accuracy"] is None and "-7 rows" in m["notes"][0]


def test_the_guards_change_nothing_on_an_exact_histogram():
    """Average precision with floored cumulative counts over every bin equals the one over the occupied bins,
    and the clips are no-ops: an exact summary's metrics are those of sklearn to the bin width."""
    rng = np.random.default_rng(5)
    y = (rng.random(3000) < 0.1).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=3000) + 1.5 * y - 1)))
    m = evaluate.merge_score_summaries([evaluate.score_summary(y, p)])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-2)
    assert m["positives"] == int(y.sum()) and "noisy" not in evaluate.score_summary(y, p)


def test_pure_modules_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import lepton_tasks.core.metrics, lepton_tasks.federation.report, lepton_tasks.core.weights\n"
        "import lepton_tasks.trainer.data\n"
        "bad = [m for m in ('tensorflow', 'keras', 'airflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
