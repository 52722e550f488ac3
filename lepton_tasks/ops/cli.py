"""The ``lepton`` command: manage the embedded stack, partners, the trainer image and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from lepton_tasks.ops.contracts_cli import contracts_app, schemas_app
from lepton_tasks.ops.embedded.process import ServiceError
from lepton_tasks.ops.enrollment_cli import coordinator_app, site_app
from lepton_tasks.ops.topology_cli import topology_app

app = typer.Typer(
    help="Lepton: federated learning on Apache Airflow.", no_args_is_help=True, pretty_exceptions_enable=False
)
partners_app = typer.Typer(help="Onboard and manage partners.", no_args_is_help=True)
images_app = typer.Typer(help="Build the trainer image.", no_args_is_help=True)
demo_app = typer.Typer(
    help="Demo scenarios: the coordinator + sites demo, or drop data as partners would.", no_args_is_help=True
)
app.add_typer(partners_app, name="partners")
app.add_typer(images_app, name="images")
app.add_typer(demo_app, name="demo")
app.add_typer(contracts_app, name="contracts")
app.add_typer(schemas_app, name="schemas")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")
app.add_typer(topology_app, name="topology")
console = Console(soft_wrap=True)


def _stack():
    from lepton_tasks.ops.embedded.stack import default_stack

    return default_stack()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(1)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Rows with every value in full: a table whose cells fold (never "…") on a terminal; plain aligned
    columns, one row per line and never wrapped, when the output is piped (grep/copy-paste friendly)."""
    if console.is_terminal:
        table = Table(*[Column(h, overflow="fold") for h in headers])
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(str(v)) for v in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        line = "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip()
        console.print(line, markup=False, highlight=False, soft_wrap=True, overflow="ignore", crop=False)


@app.command()
def up(airflow: Annotated[bool, typer.Option(help="Also start Airflow.")] = True) -> None:
    """Start the embedded development stack (OpenBao, SeaweedFS, Airflow) on 127.0.0.1: it only ingests,
    no training (a coordinator and its sites: `lepton topology up`). Idempotent."""
    from lepton_tasks.ops.embedded.docker import docker_status

    stack = _stack()
    try:
        started = stack.up(with_airflow=airflow)
    except ServiceError as exc:
        _fail(str(exc))
    for service, now in started.items():
        console.print(f"  {service:22s} {'[green]started[/]' if now else 'already running (unchanged)'}")
    if not any(started.values()):
        console.print("[bold]Nothing to do:[/] the stack was already up.")
    settings = stack.settings()
    if airflow:
        af = stack.airflow(settings)
        console.print(f"Airflow UI: {af.url}  (user admin)")
        pw_marker = settings.data_dir / "airflow" / ".password-shown"
        pw = af.admin_password()
        if pw and console.is_terminal and not pw_marker.exists():  # never into a pipe, a CI log or a file
            console.print(f"Admin password (shown once; stored 0600 in {af.password_file()}): {pw}")
            pw_marker.touch()
        elif pw:
            console.print(f"Admin password: stored 0600 in {af.password_file()}")
    ds = docker_status()
    console.print(f"Trainer runtime: {'docker' if ds.available else 'local (subprocess)'} — {ds.reason}")


@app.command()
def down() -> None:
    """Stop exactly the processes `lepton up` started, with everything they forked (their sessions, found
    through pid files; never by name)."""
    stopped = _stack().down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Show each service's pid, address, health and log file, and whether trainers run in Docker."""
    from lepton_tasks.ops.embedded.docker import docker_status

    headers = ["service", "pid", "address", "health", "log"]
    print_table(headers, [[row[h] for h in headers] for row in _stack().status()])
    ds = docker_status()
    console.print(f"docker: {'available' if ds.available else 'not available'} — {ds.reason}")


@app.command()
def logs(service: str, lines: Annotated[int, typer.Option("-n")] = 50) -> None:
    """Print the last lines of a service's log (openbao, seaweedfs, airflow-scheduler, ...)."""
    from lepton_tasks.ops.embedded.process import ManagedProcess

    proc = ManagedProcess(service, _stack().data_dir / "run")
    if not proc.log_file.exists():
        _fail(f"no log for {service!r} at {proc.log_file}")
    console.print(proc.log_tail(lines), markup=False, highlight=False)


@contracts_app.command("restage")
def contracts_restage(dataset: Annotated[str, typer.Option("--dataset", "-d")]) -> None:
    """Validate again, under DATASET's current contract, every drop staged under an older one."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.ingest.stage import restage
    from lepton_tasks.ops.partners import Registry

    stack = _stack()
    settings = stack.settings()
    if not stack.seaweedfs.proc.running():
        _fail("the stack is not running: run `lepton up` first")
    vault = Vault.connect(
        settings.vault_addr, settings.vault_token.get_secret_value(), settings.transit_mount
    )
    results = restage(
        settings,
        Storage.from_settings(settings),
        vault,
        dataset,
        allowed=Registry(settings.registry_file).allowed_datasets(),
    )
    print_table(
        ["partner", "object", "status", "error"],
        [[r.partner, r.object_key, r.status, str(getattr(r, "error", "") or "")] for r in results],
    )
    if not results:
        console.print(f"every staged {dataset} drop is already under the current contract")
    if any(r.status in ("quarantined", "failed") for r in results):
        raise typer.Exit(1)


# partners ---------------------------------------------------------------------------------------------------
def _onboarding():
    import os

    from lepton_tasks.adapters.settings import load_settings
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.ops.partners import MinioIdentities, SeaweedIdentities

    if load_settings().mode == "compose":
        # compose: endpoints and MinIO admin credentials from LEPTON_* env; the Vault root token (from
        # vault-init) in LEPTON_VAULT_ROOT_TOKEN; users/policies through MinIO's admin API (not run here yet)
        settings = load_settings()
        root = os.environ.get("LEPTON_VAULT_ROOT_TOKEN")
        if not root:
            _fail(
                "compose mode: set LEPTON_VAULT_ROOT_TOKEN (from .lepton/compose/vault-init.json) to onboard"
            )
        return (
            settings,
            Storage.from_settings(settings),
            Vault.connect(settings.vault_addr, str(root), settings.transit_mount),
            MinioIdentities(settings),
        )
    stack = _stack()
    settings = stack.settings()
    if not stack.seaweedfs.proc.running():
        _fail("the stack is not running: run `lepton up` first")
    return (
        settings,
        Storage.from_settings(settings),
        stack.root_vault(),
        SeaweedIdentities(stack.seaweedfs.shell),
    )


@partners_app.command("add")
def partners_add(name: str, dataset: Annotated[list[str], typer.Option("--dataset", "-d")]) -> None:
    """Onboard a partner: inbox bucket, Vault key + policy, inbox-only S3 credentials, registry entry."""
    from lepton_tasks.ops.partners import PartnerError, add_partner, credentials_file, validate_name

    try:
        validate_name(name)
        settings, storage, vault, identities = _onboarding()
        p = add_partner(settings, name, dataset, storage=storage, root_vault=vault, identities=identities)
    except PartnerError as exc:
        _fail(str(exc))
    console.print(
        f"onboarded [bold]{p.name}[/]: inbox s3://{p.inbox_bucket}/<dataset>/, key {p.transit_key}, "
        f"policy {p.vault_policy}; credentials in {credentials_file(settings, name)} (0600)"
    )


@partners_app.command("list")
def partners_list() -> None:
    """List onboarded partners."""
    from lepton_tasks.ops.partners import Registry

    rows = [
        [p.name, ",".join(p.datasets), p.inbox_bucket, p.transit_key]
        for p in Registry(_stack().settings().registry_file).load().values()
    ]
    print_table(["partner", "datasets", "inbox", "vault key"], rows)


@partners_app.command("show")
def partners_show(name: str) -> None:
    """Show one partner's registry entry (no secrets)."""
    from lepton_tasks.ops.partners import PartnerError, Registry

    try:
        p = Registry(_stack().settings().registry_file).get(name)
    except PartnerError as exc:
        _fail(str(exc))
    for k, v in p.model_dump().items():
        console.print(f"{k:14s} {v}")


@partners_app.command("remove")
def partners_remove(
    name: str, delete_data: Annotated[bool, typer.Option(help="Also delete inbox and key.")] = False
) -> None:
    """Revoke a partner's credentials and policy (and optionally delete its inbox and key)."""
    from lepton_tasks.ops.partners import PartnerError, remove_partner

    try:
        settings, storage, vault, identities = _onboarding()
        remove_partner(
            settings, name, storage=storage, root_vault=vault, identities=identities, delete_data=delete_data
        )
    except PartnerError as exc:
        _fail(str(exc))
    console.print(f"removed {name}")


# images -----------------------------------------------------------------------------------------------------
@images_app.command("build")
def images_build(
    base: Annotated[
        str, typer.Option(help="Base image: auto | python:3.11-slim-bookworm | debootstrap")
    ] = "auto",
    gpu: Annotated[bool, typer.Option(help="GPU variant (tensorflow[and-cuda]); untested here.")] = False,
) -> None:
    """Build the trainer image hermetically (no-op when its inputs are unchanged)."""
    from lepton_tasks.ops.embedded.stack import REPO_ROOT
    from lepton_tasks.ops.images import build_trainer_image

    stack = _stack()
    res = build_trainer_image(REPO_ROOT, base=base, gpu=gpu, cache_dir=stack.data_dir / "cache")
    console.print(f"{res.tag}: {'unchanged (no-op)' if res.skipped else 'built'} in {res.seconds:.1f}s")


# demo -------------------------------------------------------------------------------------------------------
@demo_app.command("drop")
def demo_drop(scenario: Annotated[str, typer.Option("--scenario", "-s")] = "banks", seed: int = 7) -> None:
    """Onboard the scenario's partners if needed and upload their data with their own credentials."""
    from lepton_tasks.ops.demo import drop_scenario

    for line in drop_scenario(_stack(), scenario, seed=seed):
        console.print(line)


@demo_app.command("topology")
def demo_topology(
    sites: Annotated[
        str, typer.Option(help="Comma-separated site names; empty: one per scenario partner (bank-a, …).")
    ] = "",
    root: Annotated[
        Path | None, typer.Option(help="The topology's directory (default: <LEPTON_DATA_DIR>/topology).")
    ] = None,
    scenario: Annotated[str, typer.Option("--scenario", "-s")] = "banks",
    seed: int = 7,
    rounds: Annotated[int | None, typer.Option(help="Train rounds; default: the contract's.")] = None,
    timeout: float = 1800.0,
) -> None:
    """`make demo`: a coordinator and one site per partner as separate stacks: up, each site ingests its
    partner's file, one federated run at the coordinator; prints the timings, the AUCs next to the
    references and the report. The stacks stay up (`lepton topology down`)."""
    from lepton_tasks.ops.topology_cli import _root
    from lepton_tasks.ops.topology_demo import TopologyDemoError, run_topology_demo

    names = [s.strip() for s in sites.split(",") if s.strip()]
    try:
        res = run_topology_demo(
            _root(root),
            names or None,
            rounds=rounds,
            scenario=scenario,
            seed=seed,
            timeout=timeout,
            progress=console.print,
        )
    except TopologyDemoError as exc:
        _fail(str(exc))
    console.print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items()))
    if res.peak_pss:
        console.print(f"peak memory of every stack's processes (PSS): {res.peak_pss / 1024**3:.2f} GB")
    for who, auc in res.auc.items():
        console.print(f"AUC {who}: {'n/a' if auc is None else f'{auc:.4f}'}")
    for who, auc in res.references.items():  # trained by the demo from its own files: not the federation's
        console.print(f"AUC {who} (reference, union of holdouts): {'n/a' if auc is None else f'{auc:.4f}'}")
    for who, why in res.excluded.items():
        console.print(f"EXCLUDED {who}: {why}")
    console.print(f"REPORT: {res.report_path} ({res.report_url})")
    for org, url in res.ui.items():
        console.print(f"Airflow UI {org}: {url}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
