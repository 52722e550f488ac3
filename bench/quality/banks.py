"""bench/quality/banks: the demo's acceptance check on the real ISLR ``Default`` data, for several seeds.

For each seed: three uneven non-IID banks (``lepton_tasks.ops.scenarios.banks``) drop their data, which goes
through the real path (real OpenBao + SeaweedFS started here on free loopback ports: ingest → encrypted
staging → plan → per-partner trainer jobs with scoped tokens, in-process → FedAvg rounds → held-out evaluation
inside each partner's job → publish). The demo harness then trains the centralized reference on the union.

Target: federated AUC (union of holdouts) within 0.01 of centralized and >= 0.05 above mean local-only AUC.
Usage: ``python bench/quality/banks.py [--seeds 1 2 3] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _seeded(seed: int, bank: str) -> str:
    """The partner name this benchmark gives ``bank`` for ``seed`` (each seed onboards its own partners)."""
    return f"s{seed}-{bank}"


def _fmt(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--strategy", default="fedavg")
    args = ap.parse_args()

    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.federation.plan import HParams, aggregate_round, plan_run, trainer_job
    from lepton_tasks.federation.publish import publish_run
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.demo import centralized_reference, partner_name
    from lepton_tasks.ops.embedded.stack import Ports, Stack
    from lepton_tasks.ops.partners import SeaweedIdentities, add_partner, drop_as_partner
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
    from lepton_tasks.trainer.__main__ import run_job

    rows = []
    with tempfile.TemporaryDirectory(prefix="lepton-quality-") as tmp:
        stack = Stack(Path(tmp), ports=Ports.free())
        stack.up(with_airflow=False)
        try:
            settings = stack.settings()
            storage = Storage.from_settings(settings)
            op = Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value())
            for seed in args.seeds:
                t0 = time.perf_counter()
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
                hp = HParams(
                    rounds=args.rounds,
                    local_epochs=args.local_epochs,
                    strategy=args.strategy,
                    min_partners=3,
                    seed=seed,
                )
                run_id = f"quality-seed{seed}"
                plan_run(settings, storage, op, run_id=run_id, dataset="banks", partners=partners, hparams=hp)
                for k in range(1, hp.rounds + 1):
                    for p in partners:
                        run_job(
                            trainer_job(
                                settings, storage, op, run_id=run_id, partner=p, mode="train", round_number=k
                            )
                        )
                    aggregate_round(settings, storage, run_id=run_id, round_number=k)
                for mode in ("local", "evaluate"):
                    for p in partners:
                        run_job(
                            trainer_job(
                                settings, storage, op, run_id=run_id, partner=p, mode=mode, round_number=0
                            )
                        )
                ref = centralized_reference("banks", seed=seed, hparams=hp.__dict__)
                out = publish_run(
                    settings,
                    storage,
                    run_id=run_id,
                    runtime="local (in-process benchmark)",
                    centralized=ref,
                )
                m = out["metrics"]
                row = {
                    "seed": seed,
                    "federated_auc": m["final"]["overall"]["auc"],
                    "centralized_auc": ref["overall"]["auc"],
                    "mean_local_only_auc": m["local_only"]["overall"]["auc"],
                    "local_only_union": {
                        p: v["union"].get("auc") for p, v in m["local_only"]["per_partner"].items()
                    },
                    "local_only_own_holdout": {
                        p: v.get("auc") for p, v in m["local_only"]["per_partner"].items()
                    },
                    "seconds": round(time.perf_counter() - t0, 1),
                    "report": out["report_path"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stack.down()
    print(
        "\n== bench/quality/banks (ISLR Default, 3 non-IID banks, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs, {args.strategy}) =="
    )
    banks = [partner_name(raw) for raw in SCENARIOS["banks"].partners]  # rows name them s<seed>-<bank>
    print(
        "seed  federated  centralized  mean-local-only  fed-central  fed-local  "
        + "  ".join(f"{'local ' + b:>12}" for b in banks)
    )
    ok = True
    for r in rows:
        d_c = r["federated_auc"] - r["centralized_auc"]
        d_l = r["federated_auc"] - r["mean_local_only_auc"]
        ok &= abs(d_c) <= 0.01 and d_l >= 0.05
        per_bank = "  ".join(f"{_fmt(r['local_only_union'].get(_seeded(r['seed'], b))):>12}" for b in banks)
        print(
            f"{r['seed']:>4}  {r['federated_auc']:.4f}     {r['centralized_auc']:.4f}       "
            f"{r['mean_local_only_auc']:.4f}         {d_c:+.4f}      {d_l:+.4f}    {per_bank}"
        )
    print("(last columns: each bank's local-only model scored on the union of all holdouts)")
    print("target met" if ok else "TARGET NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
