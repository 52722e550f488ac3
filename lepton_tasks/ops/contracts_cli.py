"""``lepton contracts …`` and ``lepton schemas …``: check a partner's file offline, export the schemas.

``contracts check`` runs exactly the code ingest runs (:func:`lepton_tasks.ingest.prepare.prepare_drop`: the
same reader, Great Expectations validation, cleaning and split) on a local file, writes nothing outside a
temporary folder and needs no service: a partner's engineer can check an export before uploading it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

contracts_app = typer.Typer(
    help="Dataset contracts: list them, check a file against one.", no_args_is_help=True
)
schemas_app = typer.Typer(help="JSON Schemas of every object Lepton writes or reads.", no_args_is_help=True)


@contracts_app.command("list")
def list_contracts() -> None:
    """Every dataset with a contract (the contracts folder is the dataset list), its version and hash."""
    from lepton_tasks.core.contracts import CONTRACTS_DIR, available, load_contract

    typer.echo(f"contracts folder: {CONTRACTS_DIR}")
    for name in available():
        c = load_contract(name)
        typer.echo(
            f"{c.version_tag:<24} sha256 {c.sha256[:16]}…  {len(c.columns)} columns, label {c.label!r}"
        )


@contracts_app.command("check")
def check(
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="a CSV or Parquet file"
    ),
    dataset: str = typer.Option(..., "--dataset", "-d", help="the dataset whose contract applies"),
    as_json: bool = typer.Option(False, "--json", help="print the result (or the reason) as JSON"),
) -> None:
    """Validate FILE against DATASET's contract with the code ingest runs; exit 1 with the reason if bad."""
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.drops import DropError
    from lepton_tasks.ingest.prepare import prepare_drop

    try:
        contract = load_contract(dataset)
    except KeyError as exc:
        typer.echo(f"error: {exc.args[0]}", err=True)
        raise typer.Exit(2) from None
    with tempfile.TemporaryDirectory(prefix="lepton-check-") as tmp:
        try:
            prepared = prepare_drop(file, contract, object_key=f"{dataset}/{file.name}", out_dir=Path(tmp))
        except DropError as err:
            reason = err.to_reason()
            if as_json:
                typer.echo(json.dumps(reason, indent=2))
            else:
                where = ", ".join(
                    f"{k} {v}" for k, v in (("row", err.row), ("column", err.column)) if v is not None
                )
                typer.echo(
                    f"REJECTED {file} ({err.code}{': ' + where if where else ''}): {err.message}", err=True
                )
                if err.fix:
                    typer.echo(f"fix: {err.fix}", err=True)
            raise typer.Exit(1) from None
    result = {
        "file": str(file),
        "contract": contract.version_tag,
        "rows": {"train": prepared.rows_train, "holdout": prepared.rows_holdout},
        "warnings": [
            w.model_dump(mode="json") if hasattr(w, "model_dump") else str(w) for w in prepared.warnings
        ],
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"OK {file}: passes {contract.version_tag} "
        f"({prepared.rows_train} train + {prepared.rows_holdout} holdout rows after cleaning)"
    )
    for w in result["warnings"]:
        typer.echo(f"warning: {w}")


@schemas_app.callback()
def _schemas() -> None:
    """JSON Schemas of every object Lepton writes or reads (a group, so ``export`` stays a subcommand)."""


@schemas_app.command("export")
def export_schemas(
    out_dir: Path = typer.Argument(Path("docs/schemas"), help="folder to write the *.schema.json files into"),
) -> None:
    """Write the JSON Schema of every boundary object (manifest, plan, trainer job, …)."""
    from lepton_tasks.ops.schemas import export

    for path in export(out_dir):
        typer.echo(str(path))
