"""``lepton topology …``: a coordinator and N sites as separate embedded stacks on this machine
(:mod:`lepton_tasks.ops.topology`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lepton_tasks.ops.topology import Topology

topology_app = typer.Typer(
    help="A coordinator and its sites as separate stacks on this machine (own Airflow, OpenBao, SeaweedFS).",
    no_args_is_help=True,
)

RootOption = Annotated[
    Path | None, typer.Option(help="The topology's directory (default: <LEPTON_DATA_DIR>/topology).")
]


def _root(root: Path | None) -> Path:
    from lepton_tasks.adapters.settings import load_settings

    return (root or load_settings().data_dir / "topology").resolve()


@topology_app.command("up")
def topology_up(
    sites: Annotated[str, typer.Option(help="Comma-separated site names (first `up` only).")] = "",
    airflow: Annotated[bool, typer.Option(help="Also start each organization's Airflow.")] = True,
    root: RootOption = None,
) -> None:
    """Create (first time), start and enroll the topology. Idempotent."""
    from lepton_tasks.federation.enrollment import EnrollmentError
    from lepton_tasks.ops.cli import _fail, console
    from lepton_tasks.ops.embedded.process import ServiceError
    from lepton_tasks.ops.topology import Topology, TopologyError

    where = _root(root)
    try:
        names = [s.strip() for s in sites.split(",") if s.strip()]
        topo = Topology.create(where, names) if names else Topology.load(where)
        for org, started in topo.up(with_airflow=airflow).items():
            now = [service for service, fresh in started.items() if fresh]
            console.print(
                f"  {org:14s} {'started ' + ', '.join(now) if now else 'already running (unchanged)'}"
            )
        pinned = topo.enroll()
    except (TopologyError, EnrollmentError, ServiceError) as exc:
        _fail(str(exc))
    for site, fingerprint in pinned.items():
        console.print(f"  {site:14s} enrolled; key {fingerprint}")
    _print_status(topo)


@topology_app.command("down")
def topology_down(root: RootOption = None) -> None:
    """Stop every stack of the topology (sites first)."""
    from lepton_tasks.ops.cli import _fail, console
    from lepton_tasks.ops.topology import Topology, TopologyError

    try:
        stopped = Topology.load(_root(root)).down()
    except TopologyError as exc:
        _fail(str(exc))
    for org, services in stopped.items():
        console.print(f"  {org:14s} stopped {', '.join(services) or 'nothing (not running)'}")


@topology_app.command("status")
def topology_status(root: RootOption = None) -> None:
    """Every organization's role, UI and service addresses, and data directory."""
    from lepton_tasks.ops.cli import _fail
    from lepton_tasks.ops.topology import Topology, TopologyError

    try:
        _print_status(Topology.load(_root(root)))
    except TopologyError as exc:
        _fail(str(exc))


def _print_status(topo: Topology) -> None:
    from lepton_tasks.ops.cli import print_table

    rows = [
        [org, d["role"], d["airflow"], d["s3"], d["vault"], d["data_dir"]]
        for org, d in topo.describe().items()
    ]
    print_table(["organization", "role", "Airflow UI", "S3", "Vault", "data directory"], rows)
