"""The `lepton` command against the session's real stack (found through LEPTON_DATA_DIR and its
ports.json)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lepton_tasks.ops.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(services, monkeypatch):
    monkeypatch.setenv("LEPTON_DATA_DIR", str(services.data_dir))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_up_is_idempotent_and_says_so(cli):
    res = cli("up", "--no-airflow")
    assert res.exit_code == 0, res.output
    assert "already running (unchanged)" in res.output and "Nothing to do" in res.output
    assert "Trainer runtime:" in res.output


def test_status_reports_health_and_docker(cli):
    res = cli("status")
    assert res.exit_code == 0, res.output
    assert "unsealed" in res.output and "healthy" in res.output and "docker:" in res.output


def test_partners_add_list_show_remove(cli, services):
    res = cli("partners", "add", "cli-a", "--dataset", "banks")
    assert res.exit_code == 0, res.output
    assert "inbox-cli-a" in res.output and "0600" in res.output
    again = cli("partners", "add", "cli-a", "--dataset", "banks")
    assert again.exit_code == 1 and "already exists" in again.output
    bad = cli("partners", "add", "Cli_A", "--dataset", "banks")
    assert bad.exit_code == 1 and "invalid partner name" in bad.output
    listing = cli("partners", "list")
    assert "cli-a" in listing.output
    shown = cli("partners", "show", "cli-a")
    assert "lepton-cli-a" in shown.output and "secret" not in shown.output.lower()
    assert cli("partners", "remove", "cli-a").exit_code == 0
    assert "cli-a" not in cli("partners", "list").output
    assert cli("partners", "show", "cli-a").exit_code == 1


def test_logs_prints_a_service_log(cli):
    res = cli("logs", "openbao", "-n", "5")
    assert res.exit_code == 0 and res.output.strip()


def test_status_prints_full_values_in_a_narrow_or_piped_terminal(cli, services, monkeypatch):
    """No address or path is cut to "…" (80 columns, output piped): every value can be copied as is."""
    monkeypatch.setenv("COLUMNS", "80")
    res = cli("status")
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    for row in services.status():
        line = next((ln for ln in res.output.splitlines() if ln.startswith(row["service"] + " ")), None)
        assert line is not None, f"no line for {row['service']}:\n{res.output}"
        for value in (row["address"], row["log"]):
            assert value in line, f"{value} is not printed in full:\n{res.output}"
