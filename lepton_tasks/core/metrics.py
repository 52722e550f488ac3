"""Binary-classification metrics: per partner, and overall across partners (numpy + scikit-learn only).

Labels are often imbalanced (3 % defaults, 5 % purchases), so accuracy alone says little: every metrics dict
carries AUC and PR-AUC (average precision) next to accuracy, log-loss and the positive rate.

Three ways to get an *overall* figure across partners, best first:

1. :func:`merge_score_summaries` — each partner sends :func:`score_summary` of its held-out predictions:
   per-class histograms of the predicted log-odds (2048 fine bins) plus sums. No row, label or prediction
   leaves the partner, yet the merged AUC/PR-AUC equals the pooled one up to the bin width. Use this in a
   real federation.
2. :func:`pooled_metrics` — concatenate raw ``(y_true, y_prob)`` of all partners and recompute. Exact, but it
   needs every held-out label in one place: fine for a demo or simulation, not across organizations.
3. :func:`weighted_overall` — sample-weighted means of per-partner metrics. Exact for accuracy and log-loss;
   a mean of per-partner AUCs is *not* an AUC (it ignores cross-partner ranking), so it is reported as
   ``auc_weighted_mean``/``pr_auc_weighted_mean``, never as ``auc``.

Every metrics dict (``binary_metrics``, ``pooled_metrics``, ``merge_score_summaries``) has the keys
``n, positives, positive_rate, auc, pr_auc, accuracy, log_loss, notes`` (``auc``/``pr_auc`` are ``None``
when only one class is present; ``notes`` says why); all values are JSON-serializable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-7
THRESHOLD = 0.5
#: score histograms: bins over the log-odds in [-LOGIT_RANGE, LOGIT_RANGE] (outside values go to the end bins)
LOGIT_RANGE = 16.0
N_BINS = 2048
METRIC_KEYS = ("n", "positives", "positive_rate", "auc", "pr_auc", "accuracy", "log_loss")


def _as_arrays(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0/1 labels")
    if not np.isfinite(p).all():
        raise ValueError("y_prob holds NaN/inf: the model diverged or the inputs are not model-ready")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"y_prob must be probabilities in [0, 1], got range [{p.min()}, {p.max()}]")
    return y, p


def _metrics(
    n: int,
    positives: int,
    auc: float | None,
    pr_auc: float | None,
    accuracy: float,
    log_loss_: float,
    notes: list[str],
) -> dict[str, Any]:
    """The one shape of a metrics dict (``n > 0``)."""
    return {
        "n": n,
        "positives": positives,
        "positive_rate": positives / n,
        "auc": auc,
        "pr_auc": pr_auc,
        "accuracy": accuracy,
        "log_loss": log_loss_,
        "notes": notes,
    }


def _empty(notes: list[str]) -> dict[str, Any]:
    return {
        "n": 0,
        "positives": 0,
        "positive_rate": None,
        "auc": None,
        "pr_auc": None,
        "accuracy": None,
        "log_loss": None,
        "notes": [*notes, "no samples"],
    }


def log_loss(y_true: ArrayLike, y_prob: ArrayLike, eps: float = EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``."""
    y, p = _as_arrays(y_true, y_prob)
    if y.size == 0:
        raise ValueError("log_loss of no samples")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def binary_metrics(
    y_true: ArrayLike, y_prob: ArrayLike, *, threshold: float = THRESHOLD, eps: float = EPS
) -> dict[str, Any]:
    """Metrics of predicted probabilities ``y_prob`` against 0/1 labels ``y_true``.

    ``auc`` (ROC AUC) and ``pr_auc`` (average precision) are ``None`` with a note when ``y_true`` has one
    class only; ``accuracy`` uses ``y_prob >= threshold``; ``log_loss`` is clipped at ``eps``.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = _as_arrays(y_true, y_prob)
    n = int(y.size)
    if n == 0:
        return _empty([])
    positives = int(y.sum())
    notes: list[str] = []
    auc = pr_auc = None
    if 0 < positives < n:
        auc = float(roc_auc_score(y, p))
        pr_auc = float(average_precision_score(y, p))
    else:
        notes.append(f"only one class present ({positives} positives of {n}): AUC and PR-AUC are undefined")
    return _metrics(
        n, positives, auc, pr_auc, float(np.mean((p >= threshold) == (y == 1.0))), log_loss(y, p, eps), notes
    )


def pooled_metrics(
    pairs: Iterable[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
) -> dict[str, Any]:
    """:func:`binary_metrics` of all ``(y_true, y_prob)`` pairs concatenated (needs raw predictions)."""
    ys, ps = [], []
    for y, p in pairs:
        y, p = _as_arrays(y, p)
        ys.append(y)
        ps.append(p)
    if not ys:
        return {**_empty([]), "method": "pooled"}
    return {**binary_metrics(np.concatenate(ys), np.concatenate(ps)), "method": "pooled"}


def weighted_overall(per_partner: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sample-weighted means of per-partner metrics (each needs ``n``; ``None`` values are skipped).

    Returns ``n``, ``positives``, ``positive_rate``, ``accuracy``, ``log_loss`` (exact pooled values, since
    both are means over samples), ``auc_weighted_mean``, ``pr_auc_weighted_mean`` (approximations: prefer
    :func:`merge_score_summaries` or :func:`pooled_metrics` for AUC), ``partners`` and ``method``.
    """
    total = 0
    positives = 0
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for name, m in per_partner.items():
        n = m.get("n")
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"partner {name!r}: metrics need a non-negative integer 'n', got {n!r}")
        total += int(n)
        positives += int(m.get("positives") or 0)
        for key in ("accuracy", "log_loss", "auc", "pr_auc"):
            v = m.get(key)
            if v is None or n == 0 or not math.isfinite(float(v)):
                continue
            sums[key] = sums.get(key, 0.0) + float(v) * int(n)
            weights[key] = weights.get(key, 0.0) + int(n)

    def mean(key: str) -> float | None:
        return sums[key] / weights[key] if weights.get(key) else None

    notes = []
    if any(weights.get(k, 0) < total for k in ("auc", "pr_auc")) and total:
        notes.append("some partners have a single class: they are left out of the AUC means")
    return {
        "n": total,
        "positives": positives,
        "positive_rate": positives / total if total else None,
        "accuracy": mean("accuracy"),
        "log_loss": mean("log_loss"),
        "auc_weighted_mean": mean("auc"),
        "pr_auc_weighted_mean": mean("pr_auc"),
        "partners": len(per_partner),
        "method": "weighted",
        "notes": notes,
    }


def _bin_index(p: np.ndarray, eps: float) -> np.ndarray:
    pc = np.clip(p, eps, 1.0 - eps)
    logit = np.log(pc) - np.log1p(-pc)
    scaled = (logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * N_BINS
    return np.asarray(np.clip(np.floor(scaled), 0, N_BINS - 1), dtype=np.int64)


def score_summary(
    y_true: ArrayLike, y_prob: ArrayLike, *, threshold: float = THRESHOLD, eps: float = EPS
) -> dict[str, Any]:
    """An aggregate of held-out predictions that a partner can share instead of rows (JSON-serializable).

    Holds per-class counts of predictions in :data:`N_BINS` log-odds bins (sparse ``[[bin, count], ...]``),
    the sample and positive counts, the summed clipped log-loss and the number of correct predictions at
    ``threshold``. Merge summaries with :func:`merge_score_summaries`.
    """
    y, p = _as_arrays(y_true, y_prob)
    bins = _bin_index(p, eps)
    pos = np.bincount(bins[y == 1.0], minlength=N_BINS)
    neg = np.bincount(bins[y == 0.0], minlength=N_BINS)
    pc = np.clip(p, eps, 1.0 - eps)
    return {
        "kind": "score-histogram",
        "bins": N_BINS,
        "logit_range": LOGIT_RANGE,
        "threshold": threshold,
        "n": int(y.size),
        "positives": int(y.sum()),
        "log_loss_sum": float(-np.sum(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))),
        "correct": int(np.sum((p >= threshold) == (y == 1.0))),
        "pos": [[int(i), int(pos[i])] for i in np.flatnonzero(pos)],
        "neg": [[int(i), int(neg[i])] for i in np.flatnonzero(neg)],
    }


def summary_from_counts(
    pos: ArrayLike, neg: ArrayLike, *, threshold: float = THRESHOLD, eps: float = EPS, noisy: bool = False
) -> dict[str, Any]:
    """A :func:`score_summary` built from per-class bin counts alone (dense, :data:`N_BINS` each).

    For a histogram that was released with noise: every field (``n``, ``positives``, ``correct``,
    ``log_loss_sum``) is derived from the counts, so none carries an exact value beside them. ``correct``
    and ``log_loss_sum`` take each bin's centre for its rows' score: exact for ``correct`` at threshold 0.5
    (a bin edge), within the bin width otherwise.

    ``noisy=True``: the counts are a noisy release (``site.training.private_evaluation``) and may be
    negative — they are left signed, unclamped, so that sums of them and the metrics computed from them
    stay unbiased; the summary says so (``"noisy": true``), and only such a summary may hold a negative count
    (:func:`merge_score_summaries`). Without it a negative count is an error.
    """
    p_counts = np.asarray(pos, dtype=np.int64).reshape(-1)
    n_counts = np.asarray(neg, dtype=np.int64).reshape(-1)
    if p_counts.size != N_BINS or n_counts.size != N_BINS:
        raise ValueError(f"need {N_BINS} bins per class, got {p_counts.size} and {n_counts.size}")
    if not noisy and ((p_counts < 0).any() or (n_counts < 0).any()):
        raise ValueError("bin counts must be >= 0 (only a noisy release holds signed counts)")
    width = 2 * LOGIT_RANGE / N_BINS
    centre = -LOGIT_RANGE + (np.arange(N_BINS) + 0.5) * width
    lo, hi = math.log(eps) - math.log1p(-eps), math.log1p(-eps) - math.log(eps)
    z = np.clip(centre, lo, hi)
    cut = math.log(threshold) - math.log1p(-threshold)
    predicted_positive = centre >= cut
    loss = float(np.sum(p_counts * np.logaddexp(0.0, -z)) + np.sum(n_counts * np.logaddexp(0.0, z)))
    correct = int(np.sum(p_counts[predicted_positive]) + np.sum(n_counts[~predicted_positive]))
    return {
        "kind": "score-histogram",
        "bins": N_BINS,
        "logit_range": LOGIT_RANGE,
        "threshold": threshold,
        **({"noisy": True} if noisy else {}),
        "n": int(p_counts.sum() + n_counts.sum()),
        "positives": int(p_counts.sum()),
        "log_loss_sum": loss,
        "correct": correct,
        "pos": [[int(i), int(p_counts[i])] for i in np.flatnonzero(p_counts)],
        "neg": [[int(i), int(n_counts[i])] for i in np.flatnonzero(n_counts)],
    }


def _average_precision(pos: np.ndarray, neg: np.ndarray, positives: int) -> float:
    """Average precision over the bin thresholds, from the highest bin down: sum over bins of (precision
    after including the bin) x (the bin's positives) / ``positives``. Signed (noisy) counts: the cumulative
    counts behind a precision are floored at 0 and a precision with nothing predicted positive yet is 1, the
    bins' positives stay signed (their noise averages out), and the result is clipped into [0, 1]; each of
    these is a no-op on non-negative counts."""
    tp = np.maximum(np.cumsum(pos[::-1]), 0)
    fp = np.maximum(np.cumsum(neg[::-1]), 0)
    predicted = tp + fp
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    return float(np.clip(np.sum(precision * pos[::-1]) / positives, 0.0, 1.0))


def merge_score_summaries(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall metrics from partners' :func:`score_summary` dicts, without any raw prediction.

    AUC counts a positive/negative pair in the same bin as half-correct; PR-AUC is average precision over the
    bin thresholds (:func:`_average_precision`). Both match the pooled values to about the bin width (1/64 of
    a log-odds unit).

    Noisy summaries (``"noisy": true``, :func:`summary_from_counts`) hold signed counts and are merged as
    they are: the merged counts' noise is the sum of the sites', unbiased, and every metric is computed from
    the signed counts. Only what keeps a metric defined is added, each a no-op on an exact histogram: a
    noisy total ``n`` <= 0 gives no metric (``n`` reads 0); a class whose noisy total is <= 0 gives no AUC
    or PR-AUC; ``positives`` is clipped into [0, n]; AUC, PR-AUC and accuracy into [0, 1]; log-loss at 0.
    A negative count in a summary not marked noisy is an error.
    """
    pos = np.zeros(N_BINS, np.int64)
    neg = np.zeros(N_BINS, np.int64)
    n = positives = correct = 0
    ll = 0.0
    count = 0
    noisy = False
    for s in summaries:
        if (
            s.get("kind") != "score-histogram"
            or s.get("bins") != N_BINS
            or s.get("logit_range") != LOGIT_RANGE
        ):
            raise ValueError("incompatible score summary (different kind, bin count or range)")
        signed = s.get("noisy") is True
        for c in ("pos", "neg"):
            if not signed and any(int(v) < 0 for _, v in s[c]):
                raise ValueError("a negative bin count in a score summary that is not a noisy release")
        for i, c in s["pos"]:
            pos[int(i)] += int(c)
        for i, c in s["neg"]:
            neg[int(i)] += int(c)
        n += int(s["n"])
        positives += int(s["positives"])
        correct += int(s["correct"])
        ll += float(s["log_loss_sum"])
        count += 1
        noisy = noisy or signed
    if int(pos.sum()) != positives or int(pos.sum() + neg.sum()) != n:
        raise ValueError("score summaries are inconsistent: histogram counts do not add up to n/positives")
    if n <= 0:  # below 0 only for a noisy release of (almost) no rows
        why = [f"the noisy histograms total {n} rows: no metric is defined"] if n < 0 else []
        return {**_empty(why), "method": "score-histogram", "partners": count}
    notes: list[str] = []
    auc = pr_auc = None
    n_neg = n - positives
    if positives > 0 and n_neg > 0:
        neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
        auc_raw = (np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)) / (positives * n_neg)
        auc = float(np.clip(auc_raw, 0.0, 1.0))
        pr_auc = _average_precision(pos, neg, positives)
    elif noisy:
        notes.append(
            f"a class's noisy total is <= 0 ({positives} positives of {n}): AUC and PR-AUC are undefined"
        )
    else:
        notes.append(f"only one class present ({positives} positives of {n}): AUC and PR-AUC are undefined")
    accuracy = float(np.clip(correct / n, 0.0, 1.0))
    positives_out = min(max(positives, 0), n)
    return {
        **_metrics(n, positives_out, auc, pr_auc, accuracy, max(ll / n, 0.0), notes),
        "method": "score-histogram",
        "partners": count,
    }
