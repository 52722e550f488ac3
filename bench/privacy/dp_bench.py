"""bench/privacy: time per epoch of DP-SGD (lepton_tasks.trainer.dp_sgd.DPModel) against plain Keras ``fit``.

Same process, same data, same model: a synthetic binary problem (``--rows`` 50,000 x ``--features`` 20, a
logistic label) and the contract MLP (:func:`lepton_tasks.trainer.model.build_model`, ``mlp``, hidden
``--hidden``), Adam, ``--batches`` 64 (``train_local``'s default) and 256. Per batch size, one warm-up epoch
per variant (tracing), then ``--epochs`` timed epochs, the variants interleaved in a rotating order so machine
load hits them alike; the ratio is taken per round (variant / plain of the same round), then the median.
Wall and process CPU time are both printed: on a loaded machine the CPU-time ratio is the steadier one.

Variants: ``plain`` (``model.fit``, shuffled batches), ``dp shuffle`` (DPModel on the same shuffled batches),
``dp poisson`` (DPModel on :func:`poisson_batches`, q = B/N), and ``dp jacobian`` (the per-example method the
sequence model needs, forced on the MLP, to show its O(B^2) cost). Also prints the training AUC of each, and
the eps that one epoch costs at the bench's sigma (``lepton_tasks.core.privacy``).

Usage: ``python bench/privacy/dp_bench.py [--rows 50000] [--epochs 3] [--batches 64 256] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--hidden", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (after one warm-up)")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--no-jacobian", action="store_true", help="skip the slow jacobian variant")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from lepton_tasks.core.contracts import ModelSpec
    from lepton_tasks.core.privacy import epsilon_spent
    from lepton_tasks.trainer.dp_sgd import DPModel, poisson_batches
    from lepton_tasks.trainer.model import build_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype("float32")
    y = (x @ rng.normal(size=args.features) + rng.normal(size=args.rows) > 1.0).astype("float32")
    spec = ModelSpec(kind="mlp", hidden=list(args.hidden), dropout=0.1, l2=1e-4)
    print(
        f"rows={args.rows} features={args.features} hidden={args.hidden} positives={y.mean():.3f} "
        f"tf={tf.__version__} keras={keras.__version__} cpus={os.cpu_count()} "
        f"sigma={args.noise} C={args.clip}"
    )

    results = []
    for batch in args.batches:
        variants = ["plain", "dp shuffle", "dp poisson"] + ([] if args.no_jacobian else ["dp jacobian"])
        models, fits = {}, {}
        for name in variants:
            inner = build_model(spec, args.features, seed=0)
            if name == "plain":
                model = inner
            else:
                method = "jacobian" if name == "dp jacobian" else "vectorized"
                model = DPModel(
                    inner,
                    l2_clip=args.clip,
                    noise_multiplier=args.noise,
                    expected_batch_size=batch,
                    method=method,
                )
            model.compile(
                optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=False
            )
            models[name] = (model, inner)
            if name == "dp poisson":
                data = poisson_batches(x, y, sampling_rate=batch / args.rows, seed=0)
                fits[name] = lambda m, d=data: m.fit(d, epochs=1, shuffle=False, verbose=0)
            else:
                fits[name] = lambda m, b=batch: m.fit(x, y, batch_size=b, epochs=1, shuffle=True, verbose=0)
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:  # warm-up: tracing
            fits[name](models[name][0])
        for r in range(args.epochs):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for name in order:
                t, c = time.perf_counter(), time.process_time()
                fits[name](models[name][0])
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        q = batch / args.rows
        eps_epoch = epsilon_spent(args.noise, q, round(1 / q), 1e-5)
        print(
            f"\nbatch {batch}: one epoch = {round(1 / q)} steps; "
            f"eps(delta=1e-5) of one epoch at sigma={args.noise}: {eps_epoch:.3f}"
        )
        print(f"{'variant':<12} {'s/epoch':>9} {'ratio':>7} {'cpu s':>8} {'cpu ratio':>9} {'train AUC':>10}")
        for name in variants:
            ratio = statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))
            cpu_ratio = statistics.median(t / p for t, p in zip(cpu[name], cpu["plain"], strict=True))
            inner = models[name][1]
            p = np.concatenate(
                [inner(x[i : i + 8192], training=False).numpy().ravel() for i in range(0, len(x), 8192)]
            )
            auc = roc_auc_score(y, p)
            med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
            print(f"{name:<12} {med:>9.3f} {ratio:>7.2f} {med_cpu:>8.3f} {cpu_ratio:>9.2f} {auc:>10.3f}")
            results.append(
                {
                    "batch": batch,
                    "variant": name,
                    "seconds": times[name],
                    "cpu_seconds": cpu[name],
                    "ratio": ratio,
                    "cpu_ratio": cpu_ratio,
                    "auc": auc,
                }
            )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
