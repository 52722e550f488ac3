"""bench/round: wall time of ONE federated train round for 3 and 10 sites (small data), coordinator + sites.

Real path: a coordinator and N sites, each its own embedded stack (OpenBao + SeaweedFS on free loopback
ports; no Airflow), enrolled for real (``Topology.enroll``). Each site's partner drops a 400-row shard of the
banks data (the real ISLR Default rows) and the site ingests it in its own stack (encrypted staging). Then
one federated run per N goes through the stage-2 code in-process (``lepton_tasks.ops.inprocess_run.
run_federated``: the library calls of the ``lepton_federated`` and ``lepton_site`` tasks) over the first N
sites: statistics round, ONE FedAvg train round (1 local epoch), evaluation round, publish.

What it times: the train round as the in-process runner drives it: the coordinator signs and sends N jobs,
then each site in turn verifies its job, trains (the trainer in this process by default, ``--runner
inprocess``; ``subprocess``: the local runtime, one interpreter per job) and signs its answer, then the
coordinator verifies the N answers and aggregates. The sites answer ONE AFTER ANOTHER here; in a deployment
each site trains on its own machine at the same time, so a round there takes about the slowest site plus
the coordinator's part. Prints the round's wall time, the time per site, and ratios against the first N.

Usage: ``python bench/round/bench.py [--sites 3 10] [--runner inprocess|subprocess]`` (needs ``bao`` and
``weed`` on ``PATH``: ``PATH=.venv/bin:$PATH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHARD_ROWS = 400
TRAIN_ROUND = "round 1 (train)"  # the in-process runner's timing key of the one train round


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--runner", choices=("inprocess", "subprocess"), default="inprocess")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from lepton_tasks.core.messages import TrainerHParams
    from lepton_tasks.ops.inprocess_run import ingest_at_site, inprocess_runner, run_federated
    from lepton_tasks.ops.scenarios import banks, to_csv_bytes
    from lepton_tasks.ops.topology import SiteSetup, Topology

    data = banks.load_default()  # the real ISLR Default rows in the contract's layout
    names = [f"site-{i:02d}" for i in range(max(args.sites))]
    hp = TrainerHParams(
        local_epochs=1, local_only_epochs=1, batch_size=64, learning_rate=0.005, seed=1, fedprox_mu=0.0
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="lepton-round-") as tmp:
        topo = Topology.create(Path(tmp) / "topology", names)
        try:
            t0 = time.perf_counter()
            topo.up(with_airflow=False)
            topo.enroll(SiteSetup(datasets=("banks",), min_partners=2))
            for i, name in enumerate(names):
                shard = data.sample(n=SHARD_ROWS, random_state=i)
                ingest_at_site(topo, name, to_csv_bytes(shard), dataset="banks", key="banks/shard.csv")
            print(
                f"coordinator + {len(names)} sites up, enrolled, ingested in {time.perf_counter() - t0:.0f} s"
            )
            for n in args.sites:
                result = run_federated(
                    topo,
                    dataset="banks",
                    rounds=1,
                    hparams=hp,
                    min_partners=n,
                    sites=names[:n],
                    run_name=f"round-bench-{n}-{int(time.time())}",
                    runner=inprocess_runner if args.runner == "inprocess" else None,
                )
                record = result.records[1]
                if record.accepted != sorted(names[:n]):
                    raise RuntimeError(
                        f"{n} sites: the round accepted only {record.accepted}: {record.excluded}"
                    )
                results.append(
                    {
                        "sites": n,
                        "round_seconds": result.timings[TRAIN_ROUND],
                        "run_seconds": result.timings["total"],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
        finally:
            topo.down()
    base = results[0]
    print(
        f"\n== bench/round (coordinator + sites in-process, trainer {args.runner}, {SHARD_ROWS} rows/site, "
        "1 local epoch; sites answer one after another) =="
    )
    print("sites  round_s  per_site_s  vs_first  whole_run_s")
    for r in results:
        print(
            f"{r['sites']:>5}  {r['round_seconds']:>7.1f}  {r['round_seconds'] / r['sites']:>10.2f}  "
            f"{r['round_seconds'] / base['round_seconds']:>7.2f}x  {r['run_seconds']:>11.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
