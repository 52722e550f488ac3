"""bench/quality/federated: the quality acceptance check on the coordinator + sites path, for several seeds.

A coordinator and three sites, each its own embedded stack (OpenBao + SeaweedFS on free loopback ports; no
Airflow), enrolled for real (``Topology.enroll``: coordinator enroll → site import → pin). For each seed the
three uneven non-IID banks (``lepton_tasks.ops.scenarios.banks``, site i = bank i) drop their data at their
own site, which ingests it in its own stack (encrypted staging with the site's key). Then one federated run
goes through the stage-2 code in-process (``lepton_tasks.ops.inprocess_run.run_federated``: the library
calls of the ``lepton_federated`` and ``lepton_site`` tasks): signed jobs and answers through the exchange
buckets, statistics round, FedAvg rounds with the sites training on their own data (the local trainer
runtime: the trainer as a subprocess, unless ``--runner inprocess``), the evaluation round (each site scores
the final model on its holdout and returns a score histogram) and publish. The federated AUC is the published
``metrics.json``'s ``final.overall.auc`` (merged histograms of the three holdouts).

References (outside the protocol, as stage 1's ``bench/quality/banks.py`` had them): the centralized model on
the union of the data (``lepton_tasks.ops.demo.centralized_reference``), and each site's local-only model
(the trainer's ``local`` mode at the site, ``local_epochs × rounds`` epochs) scored on every site's holdout
(``inprocess_run.local_only_baseline``); "mean local-only AUC" is the mean over banks of each local model's
AUC on the union of the holdouts (stage 1's definition, so the numbers compare).

Target (issue 10): federated AUC within 0.01 of centralized and >= 0.05 above the mean local-only AUC.
Usage: ``python bench/quality/federated.py [--seeds 1 2 3] [--rounds 5] [--runner subprocess|inprocess]``
(needs ``bao`` and ``weed`` on ``PATH``). Exit status 1 when a target is missed or a site was excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CENTRAL_TOLERANCE = 0.01
LOCAL_MARGIN = 0.05
DROP_KEY = "banks/drop.csv"  # one inbox file per bank: each seed's drop supersedes the previous seed's


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_seed(topo: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Ingest the seed's banks at their sites, run the federated run, the two references; one result row."""
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.messages import TrainerHParams
    from lepton_tasks.ops.demo import centralized_reference
    from lepton_tasks.ops.inprocess_run import (
        ingest_at_site,
        inprocess_runner,
        local_only_baseline,
        run_federated,
    )
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    sc = SCENARIOS["banks"]
    defaults = load_contract(sc.dataset).training
    t0 = time.perf_counter()
    frames = sc.generate(seed)
    for site, raw in zip(topo.sites, sc.partners, strict=True):
        ingest_at_site(topo, site, to_csv_bytes(frames[raw]), dataset=sc.dataset, key=DROP_KEY)
    t_ingest = time.perf_counter() - t0

    hparams = TrainerHParams(  # what the coordinator DAG's `start` builds from its Params
        local_epochs=args.local_epochs,
        local_only_epochs=args.local_epochs * args.rounds,
        batch_size=defaults.batch_size,
        learning_rate=defaults.learning_rate,
        seed=seed,
        fedprox_mu=0.01 if args.strategy == "fedprox" else 0.0,
    )
    t1 = time.perf_counter()
    result = run_federated(
        topo,
        dataset=sc.dataset,
        rounds=args.rounds,
        hparams=hparams,
        strategy=args.strategy,
        min_partners=len(topo.sites),
        run_name=f"quality-seed{seed}-{int(time.time())}",
        runner=inprocess_runner if args.runner == "inprocess" else None,
        progress=lambda line: print(f"  seed {seed}: {line}", flush=True),
    )
    t_fed = time.perf_counter() - t1
    all_accepted = all(r.accepted == sorted(topo.sites) and not r.exclusions for r in result.records.values())

    t2 = time.perf_counter()
    local = local_only_baseline(topo, result.run_id)
    ref = centralized_reference(
        sc.dataset,
        seed=seed,
        hparams={
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "batch_size": hparams.batch_size,
            "learning_rate": hparams.learning_rate,
            "seed": seed,
        },
    )
    t_refs = time.perf_counter() - t2
    assert result.metrics is not None  # metrics.json, loaded through RunMetrics
    fed = result.metrics.final.overall.get("auc")
    central = ref["overall"]["auc"]
    mean_local = local.mean_union_auc
    return {
        "seed": seed,
        "run_id": result.run_id,
        "federated_auc": fed,
        "centralized_auc": central,
        "mean_local_only_auc": mean_local,
        "fed_minus_central": None if fed is None else fed - central,
        "fed_minus_local": None if fed is None or mean_local is None else fed - mean_local,
        "all_sites_accepted_every_round": all_accepted,
        "excluded": result.metrics.excluded,
        "federated_per_site_auc": {
            site: m.get("auc") for site, m in result.metrics.final.per_partner.items()
        },
        "local_only_union_auc": {site: m.get("auc") for site, m in local.union.items()},
        "local_only_own_holdout_auc": {site: m.get("auc") for site, m in local.own.items()},
        "mean_local_only_own_holdout_auc": local.mean_own_auc,
        "seconds": {
            "ingest": round(t_ingest, 1),
            "federated_run": round(t_fed, 1),
            "references": round(t_refs, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "round_seconds": result.timings,
    }


def check(row: dict[str, Any]) -> tuple[bool, bool]:
    """(within 0.01 of centralized, >= 0.05 above mean local-only) for one seed's row."""
    d_c, d_l = row["fed_minus_central"], row["fed_minus_local"]
    return (
        d_c is not None and abs(d_c) <= CENTRAL_TOLERANCE,
        d_l is not None and d_l >= LOCAL_MARGIN,
    )


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, setup_s: float) -> bool:
    print(
        "\n== bench/quality/federated (coordinator + 3 sites, ISLR Default, 3 non-IID banks, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs, {args.strategy}, "
        f"trainer {args.runner}) =="
    )
    print(
        "seed  federated  centralized  |fed-central|  <=0.01  mean-local-only  fed-local  >=0.05  "
        "sites  wall s"
    )
    ok = True
    for r in rows:
        c_ok, l_ok = check(r)
        accepted = r["all_sites_accepted_every_round"]
        ok &= c_ok and l_ok and accepted
        d_c = r["fed_minus_central"]
        print(
            f"{r['seed']:>4}  {_fmt(r['federated_auc']):>9}  {_fmt(r['centralized_auc']):>11}  "
            f"{_fmt(None if d_c is None else abs(d_c)):>13}  {_verdict(c_ok):>6}  "
            f"{_fmt(r['mean_local_only_auc']):>15}  {_fmt(r['fed_minus_local'], '+.4f'):>9}  "
            f"{_verdict(l_ok):>6}  {'all' if accepted else 'EXCL':>5}  {r['seconds']['total']:>6.0f}"
        )
    sites = sorted({s for r in rows for s in r["local_only_union_auc"]})
    print("\nper bank: federated on its holdout | local-only on the union | local-only on its own holdout")
    for r in rows:
        cells = "  ".join(
            f"{s} {_fmt(r['federated_per_site_auc'].get(s))} | {_fmt(r['local_only_union_auc'].get(s))} | "
            f"{_fmt(r['local_only_own_holdout_auc'].get(s))}"
            for s in sites
        )
        print(f"{r['seed']:>4}  {cells}")
    print("\nwall seconds per seed: ingest / federated run / references (local-only + centralized)")
    for r in rows:
        s = r["seconds"]
        print(f"{r['seed']:>4}  {s['ingest']:.0f} / {s['federated_run']:.0f} / {s['references']:.0f}")
    print(f"topology up + enrollment: {setup_s:.0f} s")
    for r in rows:
        if r["excluded"]:
            print(f"seed {r['seed']} EXCLUSIONS: {r['excluded']}")
    print("target met" if ok else "TARGET NOT MET")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument(
        "--strategy",
        default="fedavg",
        help="the sites' policy allows fedavg only (Topology.enroll's default)",
    )
    ap.add_argument(
        "--runner",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="the sites' trainer: local_runner (a subprocess per job, the local runtime) or in this process",
    )
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from lepton_tasks.ops.demo import partner_name
    from lepton_tasks.ops.scenarios import SCENARIOS
    from lepton_tasks.ops.topology import SiteSetup, Topology

    sites = [partner_name(raw) for raw in SCENARIOS["banks"].partners]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lepton-quality-fed-") as tmp:
        topo = Topology.create(Path(tmp) / "topology", sites)
        try:
            t0 = time.perf_counter()
            topo.up(with_airflow=False)
            topo.enroll(SiteSetup(datasets=("banks",), min_partners=len(sites)))
            setup_s = time.perf_counter() - t0
            print(f"coordinator + {len(sites)} sites up and enrolled in {setup_s:.0f} s", flush=True)
            for seed in args.seeds:
                row = run_seed(topo, seed, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            topo.down()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if print_table(rows, args, setup_s) else 1


if __name__ == "__main__":
    sys.exit(main())
