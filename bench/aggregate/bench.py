"""FedAvg of N updates x P float32 parameters: Flower's ``aggregate`` vs lepton's ``fedavg``.

Run through ``bench/aggregate/run.sh`` (its own venv with flwr; the repo root on PYTHONPATH).

What is compared, on the SAME inputs, in the same process, alternating (the order rotates every
round, and lepton/flwr ratios are taken per round, then the median):

* ``flwr``               ``flwr.server.strategy.aggregate.aggregate(results)``
                         (``results: list[tuple[NDArrays, int]]``, float32 arithmetic).
* ``lepton list f32``    ``fedavg(list)``: updates already in memory, blocked float32 kernel.
* ``lepton list f64``    ``fedavg(list, accumulate_dtype="float64")``: blocked float64 (einsum).
* ``lepton stream f32``  ``fedavg(iter(list))``: the streaming accumulator, float32 (default).
* ``lepton stream f64``  ``fedavg(iter(list), accumulate_dtype="float64")``.

and, with the updates stored one ``.npy`` per layer per partner on disk (read back through the
page cache), a "loading from a disk-like source" pair:

* ``flwr from disk``     load every update into a list (Flower needs one), then ``aggregate``.
* ``lepton gen f32/f64`` ``fedavg(generator)`` where the generator loads one update at a time.

Two timings:

* warm: all variants in this process, alternating, ``--repeats`` rounds after an unrecorded
  warm-up round. glibc then keeps the freed 10 MB layer buffers on its heap and later calls
  reuse hot pages: the best case for flwr, whose ``aggregate`` allocates N scaled copies of
  the model every call.
* cold: each variant in a fresh subprocess (inputs loaded first, then ONE aggregation timed),
  ``--cold-repeats`` times, order rotated: what an Airflow task that aggregates once sees.

Memory, in fresh subprocesses too (so one variant's freed-but-cached heap cannot hide the next
one's), inputs loaded before measuring:

* tracemalloc peak (its own run, since tracing slows allocation): numpy reports its data
  buffers to tracemalloc, so this is exactly the peak of bytes allocated (arrays and Python
  objects) during the call, inputs excluded (BLAS-internal buffers, if any, are not seen).
  This is the number the README quotes.
* RSS high-water delta (from the cold runs, median): ``/proc/self/clear_refs`` <- 5 resets the
  kernel's VmHWM, then VmHWM - VmRSS(before). What the OS saw, allocator slack included; Linux.
"""

# ruff: noqa: E402 - numpy (OpenBLAS) must load after --blas-threads has set its environment variables

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partners", type=int, default=20, help="number of updates (default 20)")
    p.add_argument("--params", type=int, default=10_000_000, help="parameters per model (default 10M)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds, in-memory variants (default 9)")
    p.add_argument("--disk-repeats", type=int, default=3, help="timed rounds, from-disk variants (default 3)")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh-process runs per variant (default 3)")
    p.add_argument("--blas-threads", type=int, default=0, help="OPENBLAS_NUM_THREADS (0: library default)")
    p.add_argument("--workdir", default=None, help="where to write the update files (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--skip-memory", action="store_true", help="timings only")
    # internal: one variant, once, in a fresh process
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_trace", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse()
if ARGS.blas_threads:  # must be set before numpy loads OpenBLAS
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(ARGS.blas_threads)

import gc
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
from flwr.server.strategy.aggregate import aggregate as flwr_aggregate

from lepton_tasks.federation.aggregate import fedavg

MB = 1024 * 1024


def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """Four layers summing to ``params``: two kernels, a smaller kernel and a bias-sized tail."""
    if params == 10_000_000:
        return [(2000, 2500), (2500, 1000), (1000, 2497), (3000,)]
    a, b, c = params // 2, params // 4, params // 8
    return [(a,), (b,), (c,), (params - a - b - c,)]


def sample_counts(partners: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(1).integers(100, 10_000, partners)]


def write_updates(workdir: Path, partners: int, params: int) -> None:
    """One .npy per layer per partner; deterministic (seeded) values ~ N(0, 0.05)."""
    rng = np.random.default_rng(0)
    for k in range(partners):
        for i, shape in enumerate(layer_shapes(params)):
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(0.05)
            np.save(workdir / f"p{k:03d}_l{i}.npy", arr)


def load_update(workdir: Path, k: int, n_layers: int) -> list[np.ndarray]:
    return [np.load(workdir / f"p{k:03d}_l{i}.npy") for i in range(n_layers)]


def load_all(workdir: Path, partners: int, n_layers: int) -> list[list[np.ndarray]]:
    return [load_update(workdir, k, n_layers) for k in range(partners)]


# --------------------------------------------------------------------------- variants


def in_memory_variants(
    weights: list[list[np.ndarray]], counts: list[int]
) -> dict[str, Callable[[], list[np.ndarray]]]:
    updates = [(f"partner-{k:03d}", w, n) for k, (w, n) in enumerate(zip(weights, counts, strict=True))]
    results = [(w, n) for w, n in zip(weights, counts, strict=True)]
    return {
        "flwr": lambda: flwr_aggregate(results),
        "lepton list f32": lambda: fedavg(updates),
        "lepton list f64": lambda: fedavg(updates, accumulate_dtype="float64"),
        "lepton stream f32": lambda: fedavg(iter(updates)),
        "lepton stream f64": lambda: fedavg(iter(updates), accumulate_dtype="float64"),
    }


def disk_variants(
    workdir: Path, counts: list[int], n_layers: int
) -> dict[str, Callable[[], list[np.ndarray]]]:
    def gen() -> Iterator[tuple[str, list[np.ndarray], int]]:
        for k, n in enumerate(counts):
            yield f"partner-{k:03d}", load_update(workdir, k, n_layers), n

    def flwr_from_disk() -> list[np.ndarray]:
        results = [(load_update(workdir, k, n_layers), n) for k, n in enumerate(counts)]
        return flwr_aggregate(results)

    return {
        "flwr from disk": flwr_from_disk,
        "lepton gen f32": lambda: fedavg(gen()),
        "lepton gen f64": lambda: fedavg(gen(), accumulate_dtype="float64"),
    }


IN_MEMORY = ["flwr", "lepton list f32", "lepton list f64", "lepton stream f32", "lepton stream f64"]
FROM_DISK = ["flwr from disk", "lepton gen f32", "lepton gen f64"]


# --------------------------------------------------------------------------- timing


def time_rounds(variants: dict[str, Callable[[], list[np.ndarray]]], repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds after one unrecorded warm-up round; each round runs every variant once,
    in an order rotated per round."""
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            out = variants[name]()
            times[name].append(time.perf_counter() - t0)
            del out
    return times


# --------------------------------------------------------------------------- memory


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_one_here(name: str, workdir: Path, trace: bool) -> dict[str, float | None]:
    """Run one variant once in this (fresh) process: seconds, peak extra bytes (inputs excluded)."""
    partners, params = ARGS.partners, ARGS.params
    counts = sample_counts(partners)
    n_layers = len(layer_shapes(params))
    if name in IN_MEMORY:
        weights = load_all(workdir, partners, n_layers)
        fn = in_memory_variants(weights, counts)[name]
    else:
        fn = disk_variants(workdir, counts, n_layers)[name]
    gc.collect()
    hwm_ok = _reset_hwm()
    rss_before = _proc_status("VmRSS")
    if trace:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = None
    if trace:
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    hwm = _proc_status("VmHWM") - rss_before if hwm_ok else None
    del out
    return {"seconds": seconds, "tracemalloc_peak": peak, "rss_hwm_delta": hwm}


def run_one(name: str, workdir: Path, trace: bool) -> dict[str, float | None]:
    cmd = [sys.executable, __file__, "--_one", name, "--workdir", str(workdir)]
    cmd += ["--partners", str(ARGS.partners), "--params", str(ARGS.params)]
    if trace:
        cmd.append("--_trace")
    if ARGS.blas_threads:
        cmd += ["--blas-threads", str(ARGS.blas_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))


def exact_fedavg(weights: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    total = sum(counts)
    out = []
    for i in range(len(weights[0])):
        acc = np.zeros(weights[0][i].shape, np.float64)
        for w, n in zip(weights, counts, strict=True):
            acc += w[i].astype(np.float64) * n
        out.append(acc / total)
    return out


def main() -> None:
    if ARGS._one:
        print(json.dumps(run_one_here(ARGS._one, Path(ARGS.workdir), ARGS._trace)))
        return

    partners, params = ARGS.partners, ARGS.params
    model_bytes = params * 4
    tmp = Path(ARGS.workdir) if ARGS.workdir else Path(tempfile.mkdtemp(prefix="lepton-bench-agg-"))
    tmp.mkdir(parents=True, exist_ok=True)
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "partners": partners,
        "params": params,
        "layer_shapes": layer_shapes(params),
        "model_mb": model_bytes / MB,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "flwr": metadata.version("flwr"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "blas_threads": ARGS.blas_threads or "default",
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"# FedAvg bench: {partners} updates x {params:,} float32 params ({model_bytes / MB:.1f} MiB/model)"
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("partners", "params")))
    try:
        t0 = time.perf_counter()
        write_updates(tmp, partners, params)
        n_layers = len(layer_shapes(params))
        counts = sample_counts(partners)
        weights = load_all(tmp, partners, n_layers)
        print(f"# inputs written to {tmp} and loaded in {time.perf_counter() - t0:.1f}s")

        variants = in_memory_variants(weights, counts)
        # correctness first: every result against flwr and against an exact float64 FedAvg
        exact = exact_fedavg(weights, counts)
        ref = variants["flwr"]()
        agree: dict[str, dict[str, float | bool]] = {}
        for name in IN_MEMORY:
            out = ref if name == "flwr" else variants[name]()
            agree[name] = {
                "allclose_flwr": all(
                    np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(out, ref, strict=True)
                ),
                "max_abs_diff_flwr": max_abs_diff(out, ref),
                "max_abs_err_exact": max_abs_diff(out, exact),
            }
            del out
        del exact
        gc.collect()

        times = time_rounds(variants, ARGS.repeats)
        del variants, ref
        gc.collect()
        disk = disk_variants(tmp, counts, n_layers)
        disk_out = disk["lepton gen f32"]()
        ref_disk = flwr_aggregate([(w, n) for w, n in zip(weights, counts, strict=True)])
        agree["lepton gen f32"] = {
            "allclose_flwr": all(
                np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(disk_out, ref_disk, strict=True)
            ),
            "max_abs_diff_flwr": max_abs_diff(disk_out, ref_disk),
        }
        del disk_out, ref_disk
        # the weights stay loaded for the disk timings too, so every variant sees the same heap
        times.update(time_rounds(disk, ARGS.disk_repeats))
        del weights
        gc.collect()

        names = IN_MEMORY + FROM_DISK
        cold: dict[str, list[dict[str, float | None]]] = {name: [] for name in names}
        for r in range(ARGS.cold_repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cold[name].append(run_one(name, tmp, trace=False))
        memory: dict[str, dict[str, float | None]] = {}
        if not ARGS.skip_memory:
            for name in names:
                memory[name] = run_one(name, tmp, trace=True)
    finally:
        if not ARGS.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()

    def ratios(name: str, ref_name: str) -> list[float]:
        return [a / b for a, b in zip(times[name], times[ref_name], strict=True)]

    rows = []
    for name in IN_MEMORY + FROM_DISK:
        ref_name = "flwr" if name in IN_MEMORY else "flwr from disk"
        cold_s = [c["seconds"] for c in cold[name]]
        cold_ref = [c["seconds"] for c in cold[ref_name]]
        hwm = [c["rss_hwm_delta"] for c in cold[name] if c["rss_hwm_delta"] is not None]
        peak = memory.get(name, {}).get("tracemalloc_peak")
        rows.append(
            {
                "variant": name,
                "warm_median_s": statistics.median(times[name]),
                "warm_min_s": min(times[name]),
                "warm_ratio_vs_flwr": statistics.median(ratios(name, ref_name)),
                "cold_median_s": statistics.median(cold_s) if cold_s else None,
                "cold_ratio_vs_flwr": (
                    statistics.median([a / b for a, b in zip(cold_s, cold_ref, strict=True)])
                    if cold_s
                    else None
                ),
                "tracemalloc_peak_mb": peak / MB if peak is not None else None,
                "rss_hwm_delta_mb": statistics.median(hwm) / MB if hwm else None,
                **agree.get(name, {}),
            }
        )

    def fmt(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{'variant':<18} {'warm s':>7} {'vs flwr':>7} {'cold s':>7} {'vs flwr':>7} "
        f"{'peak MiB':>8} {'models':>6} {'RSS MiB':>7} {'allclose':>8} {'max|d|flwr':>10} {'max|err|':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = r["tracemalloc_peak_mb"]
        print(
            f"{r['variant']:<18} {r['warm_median_s']:>7.3f} {r['warm_ratio_vs_flwr']:>7.2f} "
            f"{fmt(r['cold_median_s'], '.3f'):>7} {fmt(r['cold_ratio_vs_flwr'], '.2f'):>7} "
            f"{fmt(peak, '.0f'):>8} {fmt(peak * MB / model_bytes if peak is not None else None, '.2f'):>6} "
            f"{fmt(r['rss_hwm_delta_mb'], '.0f'):>7} {r.get('allclose_flwr', '-')!s:>8} "
            f"{fmt(r.get('max_abs_diff_flwr'), '.1e'):>10} {fmt(r.get('max_abs_err_exact'), '.1e'):>9}"
        )
    print()
    print(f"warm: median of {ARGS.repeats} in-process rounds ({ARGS.disk_repeats} for disk rows);", end=" ")
    print(f"cold: median of {ARGS.cold_repeats} fresh-process runs.")
    print(
        "vs flwr: median over rounds of (variant time / flwr time of the same round);"
        " disk rows vs 'flwr from disk'."
    )
    print(
        "peak MiB: tracemalloc peak during the call, inputs excluded (disk rows include the loaded updates);"
    )
    print(
        f"models: that peak / one float32 model ({model_bytes / MB:.1f} MiB)."
        " RSS MiB: VmHWM delta, cold runs."
    )
    print("allclose: np.allclose(lepton, flwr, rtol=1e-5, atol=1e-6) on every layer; max|d|flwr: max abs")
    print("difference to flwr's result; max|err|: max abs error against an exact float64 FedAvg.")
    print(f"loadavg start {info['loadavg_start']}, end {info['loadavg_end']}")
    if ARGS.json:
        blob = {"info": info, "rows": rows, "warm_times": times, "cold": cold, "memory": memory}
        Path(ARGS.json).write_text(json.dumps(blob, indent=2, default=str))


if __name__ == "__main__":
    main()
