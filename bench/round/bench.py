"""bench/round: wall time of ONE federated round for 3, 10 and 20 partners (small data) in Docker.

Real path: OpenBao + SeaweedFS started here on free loopback ports; N partners onboarded, their banks-data
shards ingested (encrypted staging); then one round = N trainer containers (the trainer image, host network,
job in the environment, at most ``--parallel`` at a time like Airflow's parallelism) + the aggregation.
Prints the round's wall time, the time per partner, and ratios against the 3-partner round of the same run.

Usage: ``python bench/round/bench.py [--partners 3 10 20] [--parallel 2]`` (needs a Docker daemon and
``lepton images build``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--partners", type=int, nargs="+", default=[3, 10, 20])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--image", default="lepton-trainer:latest")
    args = ap.parse_args()

    import docker
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.federation.plan import HParams, aggregate_round, plan_run, trainer_job
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.embedded.stack import Ports, Stack
    from lepton_tasks.ops.partners import SeaweedIdentities, add_partner, drop_as_partner
    from lepton_tasks.ops.scenarios import banks, to_csv_bytes

    client = docker.from_env()
    client.images.get(args.image)  # fail early with a clear docker error if the image is missing
    data = banks.load_default()  # the real ISLR Default rows in the contract's layout
    results = []
    shard_rows = 400
    with tempfile.TemporaryDirectory(prefix="lepton-round-") as tmp:
        stack = Stack(Path(tmp), ports=Ports.free())
        stack.up(with_airflow=False)
        try:
            settings = stack.settings()
            storage = Storage.from_settings(settings)
            op = Vault.connect(settings.vault_addr, settings.vault_token.get_secret_value())
            for n in args.partners:
                names = [f"n{n}-p{i:02d}" for i in range(n)]
                for i, name in enumerate(names):
                    add_partner(
                        settings,
                        name,
                        ["banks"],
                        storage=storage,
                        root_vault=stack.root_vault(),
                        identities=SeaweedIdentities(stack.seaweedfs.shell),
                    )
                    shard = data.sample(n=shard_rows, random_state=i)
                    drop_as_partner(settings, name, "banks/shard.csv", to_csv_bytes(shard))
                    ingest_drop(settings, storage, op, name, "banks/shard.csv")
                run_id = f"round-bench-{n}"
                plan_run(
                    settings,
                    storage,
                    op,
                    run_id=run_id,
                    dataset="banks",
                    partners=names,
                    hparams=HParams(rounds=1, local_epochs=1, min_partners=n),
                )

                def one(p: str, run_id: str = run_id) -> float:
                    job = trainer_job(
                        settings, storage, op, run_id=run_id, partner=p, mode="train", round_number=1
                    )
                    t = time.perf_counter()
                    client.containers.run(
                        args.image,
                        ["--partner", p, "--mode", "train", "--round", "1"],
                        environment={"LEPTON_JOB": json.dumps(job)},
                        network_mode="host",
                        remove=True,
                        stdout=True,
                        stderr=True,
                    )
                    return time.perf_counter() - t

                t0 = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                    per = list(pool.map(one, names))
                t_agg = time.perf_counter()
                aggregate_round(settings, storage, run_id=run_id, round_number=1)
                wall = time.perf_counter() - t0
                results.append(
                    {
                        "partners": n,
                        "round_seconds": round(wall, 2),
                        "aggregate_seconds": round(time.perf_counter() - t_agg, 3),
                        "container_seconds_median": round(sorted(per)[len(per) // 2], 2),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
        finally:
            stack.down()
    base = results[0]
    print(f"\n== bench/round (Docker, parallel={args.parallel}, {shard_rows} rows/partner, 1 local epoch) ==")
    print("partners  round_s  per_partner_s  vs_first  container_median_s  aggregate_s")
    for r in results:
        print(
            f"{r['partners']:>8}  {r['round_seconds']:>7.1f}  {r['round_seconds'] / r['partners']:>13.2f}  "
            f"{r['round_seconds'] / base['round_seconds']:>7.2f}x  {r['container_seconds_median']:>18.2f}  "
            f"{r['aggregate_seconds']:>11.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
