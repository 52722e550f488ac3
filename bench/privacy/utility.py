"""bench/privacy/utility: what record-level DP costs in model quality, on the banks data, side by side.

For each seed, in one process and against one real embedded stack (OpenBao + SeaweedFS on free loopback
ports, as bench/quality/banks.py): three non-IID banks (``lepton_tasks.ops.scenarios.banks``) drop and
ingest their data once; then, on the same staged data,

* the non-private run: plan → 5 FedAvg rounds × 2 local epochs (per-partner trainer jobs in-process) →
  local-only models → held-out evaluation inside each partner's job;
* one DP run per target epsilon (default 1, 3, 8 at delta 1e-5): the same hyper-parameters plus
  ``dp_noise_multiplier`` = sigma, calibrated so that the WHOLE run (every round's DP-SGD steps composed by
  the RDP accountant, ``core.privacy.epsilon_spent(sigma, q_p, rounds x steps_p, delta)``) costs at most the
  target at EVERY partner. Poisson sampling rate ``q_p = B / N_p`` and ``steps_p = local_epochs x
  ceil(N_p / B)`` per round (``trainer.local.dp_schedule``) differ per bank; one sigma serves the run, so the
  smallest bank (largest q) sets it: found by bisection on log sigma, the other banks spend less. The
  epsilon each bank really spent is recomposed afterwards from the charges inside its update files
  (``UpdateMeta.privacy`` of every round, ``core.privacy.epsilon_of``), checked and printed.

DP runs train no local-only model (it would be one more DP training at each bank: its epsilon composes with
the run's; in the trigger form's DAG it does run, with DP): the local-only baseline is the non-private run's,
which is what a bank that does not federate gets, since its data never leaves it.

AUCs: the published global model (the round chosen by federated held-out AUC, as in production) on the union
of the three holdouts (exact, from score histograms); mean local-only: each bank's local-only model on the
union, averaged. Targets at the largest epsilon: within 0.02 of non-private federated, and >= 0.03 above the
mean local-only AUC.

Usage: ``python bench/privacy/utility.py [--seeds 1 2 3] [--epsilons 1 3 8] [--json out.json]``
(needs ``bao`` and ``weed`` on PATH: ``PATH=.venv/bin:$PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _seeded(seed: int, bank: str) -> str:
    """The partner name of ``bank`` for ``seed`` (each seed onboards its own partners)."""
    return f"p{seed}-{bank}"


def calibrate_sigma(
    sizes: dict[str, int],
    *,
    target_epsilon: float,
    delta: float,
    batch_size: int,
    epochs_per_round: int,
    rounds: int,
    lo: float = 0.3,
    hi: float = 200.0,
    rel_tol: float = 1e-3,
) -> tuple[float, dict[str, float]]:
    """The smallest noise multiplier (to ``rel_tol``) whose run costs <= ``target_epsilon`` at every partner.

    ``sizes``: partner → training rows. Returns ``(sigma, {partner: epsilon of the whole run})``. Epsilon is
    decreasing in sigma, so bisection on log sigma; the bracket's upper end always meets the target.
    """
    from lepton_tasks.core.privacy import epsilon_spent
    from lepton_tasks.trainer.local import dp_schedule

    schedules = {p: dp_schedule(n, batch_size, epochs_per_round) for p, n in sizes.items()}

    def worst(sigma: float) -> dict[str, float]:
        return {p: epsilon_spent(sigma, q, rounds * steps, delta) for p, (q, steps) in schedules.items()}

    if max(worst(hi).values()) > target_epsilon:
        raise ValueError(f"even sigma={hi} costs more than epsilon={target_epsilon}")
    if max(worst(lo).values()) <= target_epsilon:
        return lo, worst(lo)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if max(worst(mid).values()) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi, worst(hi)


def _spent_per_partner(storage, settings, run_id: str, partners: list[str], rounds: int) -> dict[str, float]:
    """Each partner's epsilon over the run, recomposed from the charges in its update files."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.messages import UpdateMeta, load
    from lepton_tasks.core.privacy import Charge, epsilon_of
    from lepton_tasks.federation.plan import run_prefix

    out = {}
    for p in partners:
        charges, delta = [], None
        for k in range(1, rounds + 1):
            key = f"{run_prefix(run_id)}round-{k}/{p}.update"
            _, raw = wio.loads(storage.get_bytes(settings.models_bucket, key))
            priv = load(UpdateMeta, raw, where=key).privacy
            if priv is None:
                raise RuntimeError(f"{key}: a DP run's update carries no privacy charge")
            delta = priv.delta
            charges.append(
                Charge(
                    run_id=run_id,
                    round=k,
                    dataset="banks",
                    noise_multiplier=priv.noise_multiplier,
                    sampling_rate=priv.sampling_rate,
                    steps=priv.steps,
                    sampling=priv.sampling,
                )
            )
        out[p] = epsilon_of(charges, delta)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-example L2 clip")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--learning-rate", type=float, default=0.005)
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()

    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.federation.plan import (
        HParams,
        aggregate_round,
        collect_metrics,
        plan_run,
        read_plan,
        trainer_job,
    )
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.demo import partner_name
    from lepton_tasks.ops.embedded.stack import Ports, Stack
    from lepton_tasks.ops.partners import SeaweedIdentities, add_partner, drop_as_partner
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
    from lepton_tasks.trainer.__main__ import run_job

    def federate(settings, storage, op, run_id, partners, hp, *, local_only: bool) -> dict[str, Any]:
        plan_run(settings, storage, op, run_id=run_id, dataset="banks", partners=partners, hparams=hp)
        for k in range(1, hp.rounds + 1):
            for p in partners:
                job = trainer_job(
                    settings, storage, op, run_id=run_id, partner=p, mode="train", round_number=k
                )
                run_job(job)
            aggregate_round(settings, storage, run_id=run_id, round_number=k)
        for mode in ("local", "evaluate") if local_only else ("evaluate",):
            for p in partners:
                job = trainer_job(settings, storage, op, run_id=run_id, partner=p, mode=mode, round_number=0)
                run_job(job)
        return collect_metrics(settings, storage, run_id=run_id, runtime="local").model_dump(
            mode="json", by_alias=True
        )

    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:  # as it comes: a long run stopped early keeps its rows
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lepton-dp-utility-") as tmp:
        stack = Stack(Path(tmp), ports=Ports.free())
        stack.up(with_airflow=False)
        try:
            settings = stack.settings()
            storage = Storage.from_settings(settings)
            op = Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value())
            for seed in args.seeds:
                partners = []
                for raw, df in SCENARIOS["banks"].generate(seed).items():
                    name = _seeded(seed, partner_name(raw))
                    add_partner(
                        settings,
                        name,
                        ["banks"],
                        storage=storage,
                        root_vault=stack.root_vault(),
                        identities=SeaweedIdentities(stack.seaweedfs.shell),
                    )
                    drop_as_partner(settings, name, "banks/drop.csv", to_csv_bytes(df))
                    ingest_drop(settings, storage, op, name, "banks/drop.csv")
                    partners.append(name)
                base = {
                    "rounds": args.rounds,
                    "local_epochs": args.local_epochs,
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "strategy": "fedavg",
                    "min_partners": 3,
                    "seed": seed,
                }
                t0 = time.perf_counter()
                run_id = f"dp-utility-seed{seed}-nonprivate"
                m = federate(settings, storage, op, run_id, partners, HParams(**base), local_only=True)
                plan = read_plan(storage, settings, run_id)
                sizes = {p: sum(d.rows.train for d in plan.drops[p]) for p in partners}
                row = {
                    "seed": seed,
                    "setting": "non-private",
                    "target_epsilon": None,
                    "sigma": None,
                    "federated_auc": m["final"]["overall"]["auc"],
                    "mean_local_only_auc": m["local_only"]["overall"]["auc"],
                    "train_rows": sizes,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                record(row)
                baseline = row
                for eps in args.epsilons:
                    t0 = time.perf_counter()
                    sigma, planned = calibrate_sigma(
                        sizes,
                        target_epsilon=eps,
                        delta=args.delta,
                        batch_size=args.batch_size,
                        epochs_per_round=args.local_epochs,
                        rounds=args.rounds,
                    )
                    hp = HParams(**base, dp_noise_multiplier=sigma, dp_l2_clip=args.clip, dp_delta=args.delta)
                    run_id = f"dp-utility-seed{seed}-eps{eps:g}"
                    m = federate(settings, storage, op, run_id, partners, hp, local_only=False)
                    spent = _spent_per_partner(storage, settings, run_id, partners, args.rounds)
                    for p in partners:  # the charges the trainers reported are the ones calibrated
                        if not math.isclose(spent[p], planned[p], rel_tol=1e-9):
                            raise RuntimeError(f"{p}: planned eps {planned[p]}, the updates say {spent[p]}")
                    row = {
                        "seed": seed,
                        "setting": f"eps={eps:g}",
                        "target_epsilon": eps,
                        "sigma": round(sigma, 4),
                        "federated_auc": m["final"]["overall"]["auc"],
                        "mean_local_only_auc": baseline["mean_local_only_auc"],
                        "epsilon_spent": {p: round(v, 3) for p, v in spent.items()},
                        "per_round_auc": [(r.get("global") or {}).get("auc") for r in m["rounds"]],
                        "published_round": m["lineage"]["published_round"],
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                    record(row)
        finally:
            stack.down()
    total = time.perf_counter() - started

    top = max(args.epsilons)
    print(
        f"\n== bench/privacy/utility (banks, ISLR Default, 3 non-IID banks; {args.rounds} FedAvg rounds x "
        f"{args.local_epochs} local epochs, B={args.batch_size}, lr={args.learning_rate}; DP-SGD on Poisson "
        f"batches, clip {args.clip}, delta {args.delta:g}, epsilon of the whole run at the smallest bank) =="
    )
    print("seed  setting       sigma   federated AUC  vs non-private  vs mean local-only  eps spent per bank")
    ok = True
    base_by_seed = {r["seed"]: r for r in rows if r["setting"] == "non-private"}
    for r in rows:
        b = base_by_seed[r["seed"]]
        d_np = r["federated_auc"] - b["federated_auc"]
        d_lo = r["federated_auc"] - b["mean_local_only_auc"]
        if r["target_epsilon"] == top:
            ok &= d_np >= -0.02 and d_lo >= 0.03
        spent = " ".join(f"{v:.2f}" for v in (r.get("epsilon_spent") or {}).values()) or "-"
        sigma = f"{r['sigma']:.3f}" if r["sigma"] is not None else "-"
        print(
            f"{r['seed']:>4}  {r['setting']:<12} {sigma:>6}   {r['federated_auc']:.4f}         "
            f"{d_np:+.4f}          {d_lo:+.4f}           {spent}"
        )
    for seed, b in base_by_seed.items():
        print(f"seed {seed}: mean local-only AUC {b['mean_local_only_auc']:.4f}, rows {b['train_rows']}")
    print(f"total {total / 60:.1f} min")
    print(f"target at eps={top:g} met" if ok else f"TARGET AT eps={top:g} NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
