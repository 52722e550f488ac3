"""`lepton contracts check`: a partner's file checked offline with the same code as ingest."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lepton_tasks.ops.contracts_cli import contracts_app, schemas_app
from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

runner = CliRunner()


@pytest.fixture(scope="module")
def bank_frame():
    frames = SCENARIOS["banks"].generate(3)
    return next(iter(frames.values())).head(300).copy()


def test_a_good_file_passes_with_its_row_counts(tmp_path, bank_frame):
    path = tmp_path / "good.csv"
    path.write_bytes(to_csv_bytes(bank_frame))
    res = runner.invoke(contracts_app, ["check", "--dataset", "banks", "--json", str(path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["contract"] == "banks@v1"
    assert out["rows"]["train"] + out["rows"]["holdout"] == len(bank_frame)


def test_a_bad_cell_is_rejected_naming_row_and_column(tmp_path, bank_frame):
    bad = bank_frame.astype({"balance": object})
    bad.loc[bad.index[5], "balance"] = "lots"
    path = tmp_path / "bad.csv"
    path.write_bytes(to_csv_bytes(bad))
    res = runner.invoke(contracts_app, ["check", "--dataset", "banks", "--json", str(path)])
    assert res.exit_code == 1
    reason = json.loads(res.output)
    assert reason["column"] == "balance" and reason["row"] is not None


def test_an_unknown_dataset_names_the_known_ones(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a\n1\n")
    res = runner.invoke(contracts_app, ["check", "--dataset", "nope", str(path)])
    assert res.exit_code == 2 and "banks" in res.output


def test_schemas_export_writes_every_schema(tmp_path):
    res = runner.invoke(schemas_app, ["export", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "trainer-job.schema.json").is_file() and (tmp_path / "plan.schema.json").is_file()
