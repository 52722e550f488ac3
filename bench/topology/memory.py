"""Memory of the embedded topology (a coordinator + N sites, each its own OpenBao, SeaweedFS and Airflow) vs
one single stack (``lepton up``'s; stage 1's when the documented numbers were measured, now ingest-only),
measured side by side in one run on this machine.

Both are started with Airflow (api-server, scheduler, dag-processor, triggerer) and left idle for
``--settle`` seconds (DAG files parsed); then every process of every stack's sessions is measured:
RSS (what `ps` shows, shared pages counted in every process) and PSS (shared pages split between the
processes that share them: their sum is what the machine really holds). The issue's budget is 6 GB resident
for four stacks.

    python bench/topology/memory.py --sites 3         # ~5 min on 2 cores; prints a table and the ratio

Needs `bao` and `weed` on PATH (the venv's bin) and nothing else listening on the ports it picks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from lepton_tasks.ops.embedded.process import session_members
from lepton_tasks.ops.embedded.stack import Ports, Stack
from lepton_tasks.ops.topology import Topology

GB = 1024**3


def stack_memory(stack: Stack) -> tuple[int, int, int]:
    """(processes, RSS bytes, PSS bytes) of every process in the sessions this stack's pid files name."""
    pids: set[int] = set()
    for pid_file in (stack.data_dir / "run").glob("*.pid"):
        leader = json.loads(pid_file.read_text())["pid"]
        pids |= set(session_members(int(leader)))
    rss = pss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += info.pss
    return len(pids), rss, pss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--settle", type=float, default=60.0, help="idle seconds before measuring")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lepton-bench-topology-") as tmp:
        root = Path(tmp)
        single = Stack(root / "single", ports=Ports.free())
        topo = Topology.create(root / "topology", [f"site-{i + 1}" for i in range(args.sites)])
        try:
            t0 = time.monotonic()
            single.up(with_airflow=True)
            t_single = time.monotonic() - t0
            t0 = time.monotonic()
            topo.up(with_airflow=True)
            topo.enroll()
            t_topo = time.monotonic() - t0
            time.sleep(args.settle)
            rows = {"single stack (baseline)": stack_memory(single)}
            rows |= {f"{org} ({s.role})": stack_memory(s) for org, s in topo.stacks().items()}
        finally:
            topo.down()
            single.down()

    print(f"{'stack':32s} {'procs':>5s} {'RSS GB':>8s} {'PSS GB':>8s}")
    for name, (n, rss, pss) in rows.items():
        print(f"{name:32s} {n:5d} {rss / GB:8.2f} {pss / GB:8.2f}")
    base = rows["single stack (baseline)"]
    topo_rows = [v for k, v in rows.items() if not k.startswith("single")]
    total_rss, total_pss = sum(r for _, r, _ in topo_rows), sum(p for _, _, p in topo_rows)
    print(
        f"topology of {len(topo_rows)} stacks: RSS {total_rss / GB:.2f} GB, PSS {total_pss / GB:.2f} GB "
        f"(budget 6 GB); ratio to the single stack: RSS {total_rss / base[1]:.2f}x, "
        f"PSS {total_pss / base[2]:.2f}x"
    )
    print(
        f"start times on this machine: single stack {t_single:.0f} s; topology (up + enroll) {t_topo:.0f} s"
    )


if __name__ == "__main__":
    main()
