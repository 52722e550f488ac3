"""What the evaluation round's DP costs in accuracy: the AUC of a noisy score histogram against the exact one.

Under DP a site's evaluation answer is ONE Gaussian release of its held-out score histogram
(``lepton_tasks.site.training.private_evaluation``: 66 fixed bins per class, noise of std sigma on every
bin, rounded, NOT clamped — signed counts, every metric recomputed from them and clipped into its range).
Its sigma is calibrated from the run's evaluation epsilon (``core.privacy.evaluation_sigma``). This bench
draws held-out labels and scores of a model with AUC about 0.88 (20 % positives; the same draw as
``tests/unit/site/test_evaluation_privacy.py``), releases the histogram ``--releases`` times per setting
and prints the mean and standard deviation of (noisy AUC - exact AUC) and the mean (noisy PR-AUC - exact
PR-AUC), per row count and per evaluation epsilon, for the release as it is ("unclamped") beside the release
as it was until 2026-12-03 ("clamped": the same noise, each count clamped at 0 before the metrics; the bench
wraps ``core.privacy.noisy_counts`` for it). Exact: the metrics of the un-noised, full-resolution block, so
the deltas include the regrouping to 66 bins; the column "66 bins, no noise" is the regrouping's own share
(the metrics a release estimates).

    .venv/bin/python bench/privacy/evaluation_noise.py --rows 1000 3000 10000 --epsilons 4.7285 1

(epsilon 4.7285 is sigma = 1: the DP-SGD sigma the evaluation used before it had an epsilon of its own.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from lepton_tasks.core import metrics, privacy
from lepton_tasks.core.messages import DPTraining
from lepton_tasks.core.privacy import evaluation_sigma
from lepton_tasks.site.training import _dense, _regroup, _spread, private_evaluation


def _block(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(float)
    p = 1 / (1 + np.exp(-rng.normal(-1.5 + 1.6 * y, 1.0)))
    return {**metrics.binary_metrics(y, p), "score_summary": metrics.score_summary(y, p)}


@contextmanager
def _clamped() -> Iterator[None]:
    """The release as it was: the same noisy counts, clamped at 0 (``private_evaluation`` imports
    ``noisy_counts`` from the module when it runs, so the wrapper is what it calls)."""
    signed = privacy.noisy_counts
    privacy.noisy_counts = lambda counts, sigma: np.maximum(signed(counts, sigma), 0)  # type: ignore[assignment]
    try:
        yield
    finally:
        privacy.noisy_counts = signed


def _deltas(block: dict[str, Any], dp: DPTraining, releases: int) -> dict[str, np.ndarray]:
    out = [private_evaluation(block, dp) for _ in range(releases)]
    return {
        "auc": np.array([o["auc"] - block["auc"] for o in out], dtype=float),
        "pr_auc": np.array([o["pr_auc"] - block["pr_auc"] for o in out], dtype=float),
        "n": np.array([o["n"] - block["n"] for o in out], dtype=float),
    }


def _grouped(block: dict[str, Any]) -> dict[str, Any]:
    """The metrics of the block's histogram regrouped to the release's 66 bins, without noise."""
    s = block["score_summary"]
    counts = [_spread(_regroup(_dense(s[c]))) for c in ("pos", "neg")]
    return metrics.merge_score_summaries([metrics.summary_from_counts(*counts)])


def _pair(old: dict[str, np.ndarray], new: dict[str, np.ndarray], key: str, f: Any, fmt: str) -> str:
    return f"{format(f(old[key]), fmt)} / {format(f(new[key]), fmt)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[4.7285, 1.0])
    parser.add_argument("--releases", type=int, default=300)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        "| held-out rows | evaluation ε | σ | exact AUC / PR-AUC | 66 bins, no noise: Δ AUC / Δ PR-AUC "
        "| mean Δ AUC clamped / unclamped "
        "| sd Δ AUC clamped / unclamped | RMSE AUC clamped / unclamped | mean Δ PR-AUC clamped / unclamped "
        "| mean Δ n clamped / unclamped |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.rows:
        block = _block(n, args.seed)
        grouped = _grouped(block)
        exact = f"{block['auc']:.4f} / {block['pr_auc']:.4f}"
        regrouped = f"{grouped['auc'] - block['auc']:+.4f} / {grouped['pr_auc'] - block['pr_auc']:+.4f}"
        for eps in args.epsilons:
            dp = DPTraining(noise_multiplier=1.0, delta=args.delta, evaluation_epsilon=eps)
            with _clamped():
                old = _deltas(block, dp, args.releases)
            new = _deltas(block, dp, args.releases)
            cells = [
                _pair(old, new, "auc", np.mean, "+.4f"),
                _pair(old, new, "auc", lambda d: d.std(ddof=1), ".4f"),
                _pair(old, new, "auc", lambda d: np.sqrt(np.mean(d**2)), ".4f"),
                _pair(old, new, "pr_auc", np.mean, "+.4f"),
                _pair(old, new, "n", np.mean, "+.0f"),
            ]
            row = [f"{n:,}", f"{eps:g}", f"{evaluation_sigma(dp):.3f}", exact, regrouped, *cells]
            print(f"| {' | '.join(row)} |")
    print(f"\n{args.releases} releases per row and variant; {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
