"""An embedded site polls its exchange bucket every 2 s (the coordinator's storage is on the same machine);
the setting reaches its Airflow, where the site DAG's exchange watcher reads it. An explicit
LEPTON_EXCHANGE_POLL_SECONDS wins; other roles keep the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_tasks.ops.embedded.stack import EMBEDDED_SITE_POLL_S, Ports, Stack


def _stack(tmp_path: Path, role: str) -> Stack:
    return Stack(tmp_path / role, ports=Ports.free(), role=role)  # type: ignore[arg-type]


def test_an_embedded_site_polls_every_2_s_and_its_airflow_gets_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LEPTON_EXCHANGE_POLL_SECONDS", raising=False)
    stack = _stack(tmp_path, "site")
    settings = stack.settings()
    assert settings.exchange_poll_seconds == EMBEDDED_SITE_POLL_S == 2.0
    assert stack.airflow(settings).env()["LEPTON_EXCHANGE_POLL_SECONDS"] == "2.0"


@pytest.mark.parametrize("role", ["coordinator", "single"])
def test_other_roles_keep_the_default(tmp_path, monkeypatch, role):
    monkeypatch.delenv("LEPTON_EXCHANGE_POLL_SECONDS", raising=False)
    assert _stack(tmp_path, role).settings().exchange_poll_seconds == 10.0


def test_an_explicit_setting_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_EXCHANGE_POLL_SECONDS", "7.5")
    stack = _stack(tmp_path, "site")
    assert stack.settings().exchange_poll_seconds == 7.5
    assert stack.airflow(stack.settings()).env()["LEPTON_EXCHANGE_POLL_SECONDS"] == "7.5"
