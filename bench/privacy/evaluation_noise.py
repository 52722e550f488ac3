"""What the evaluation round's DP costs in accuracy: the AUC of a noisy score histogram against the exact one.

Under DP a site's evaluation answer is ONE Gaussian release of its held-out score histogram
(``lepton_tasks.site.training.private_evaluation``: 66 fixed bins per class, noise of std sigma on every
bin, rounded and clamped at 0, every metric recomputed from it). Its sigma is calibrated from the run's
evaluation epsilon (``core.privacy.evaluation_sigma``). This bench draws held-out labels and scores of a
model with AUC about 0.8 (20 % positives; the same draw as ``tests/unit/site/test_evaluation_privacy.py``),
releases the histogram ``--releases`` times per setting and prints the mean and standard deviation of
(noisy AUC - exact AUC), per row count and per evaluation epsilon.

    .venv/bin/python bench/privacy/evaluation_noise.py --rows 1000 3000 10000 --epsilons 4.7285 1

(epsilon 4.7285 is sigma = 1: the DP-SGD sigma the evaluation used before it had an epsilon of its own.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lepton_tasks.core import metrics
from lepton_tasks.core.messages import DPTraining
from lepton_tasks.core.privacy import evaluation_sigma
from lepton_tasks.site.training import private_evaluation


def _block(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(float)
    p = 1 / (1 + np.exp(-rng.normal(-1.5 + 1.6 * y, 1.0)))
    return {**metrics.binary_metrics(y, p), "score_summary": metrics.score_summary(y, p)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[4.7285, 1.0])
    parser.add_argument("--releases", type=int, default=300)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    print("| held-out rows | evaluation ε | σ | exact AUC | mean Δ AUC | sd Δ AUC | mean Δ n |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.rows:
        block = _block(n, args.seed)
        for eps in args.epsilons:
            dp = DPTraining(noise_multiplier=1.0, delta=args.delta, evaluation_epsilon=eps)
            out = [private_evaluation(block, dp) for _ in range(args.releases)]
            d_auc = np.array([o["auc"] - block["auc"] for o in out])
            d_n = np.array([o["n"] - block["n"] for o in out])
            print(
                f"| {n:,} | {eps:g} | {evaluation_sigma(dp):.3f} | {block['auc']:.4f} | "
                f"{d_auc.mean():+.4f} | {d_auc.std(ddof=1):.4f} | {d_n.mean():+.0f} |"
            )
    print(f"\n{args.releases} releases per row; {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
