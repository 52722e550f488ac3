"""The site's job DAG (dags/lepton_site.py) as a site's Airflow parses it: one task between a job's arrival
and its answer when no approval is needed (the site's part of every federated round's critical path), the
approval path off that path, and the exchange watcher polling at ``LEPTON_EXCHANGE_POLL_SECONDS``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

DAG_FILE = Path(__file__).resolve().parents[3] / "dags" / "lepton_site.py"


def _load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Any:
    """The DAG file, imported as the site's DAG processor does (role ``site``, this environment)."""
    monkeypatch.setenv("LEPTON_ROLE", "site")
    monkeypatch.setenv("LEPTON_DATA_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(f"lepton_site_{tmp_path.name}", DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_exchange_watcher_polls_at_the_configured_interval(monkeypatch, tmp_path):
    module = _load(monkeypatch, tmp_path, LEPTON_EXCHANGE_POLL_SECONDS="2")
    [watcher] = module.EXCHANGE_JOBS.watchers
    assert watcher.trigger.poll_interval == 2.0
    assert watcher.trigger.serialize()[1]["poll_interval"] == 2.0  # what the triggerer runs


def test_the_default_poll_interval_is_ten_seconds(monkeypatch, tmp_path):
    monkeypatch.delenv("LEPTON_EXCHANGE_POLL_SECONDS", raising=False)
    [watcher] = _load(monkeypatch, tmp_path).EXCHANGE_JOBS.watchers
    assert watcher.trigger.poll_interval == 10.0


def test_a_job_needing_no_approval_is_answered_by_the_one_task_after_jobs(monkeypatch, tmp_path):
    dag = _load(monkeypatch, tmp_path).lepton_site()
    tasks = dag.task_dict
    assert set(tasks) == {"jobs", "handle", "approval_requests", "approve", "answer", "summary"}
    assert tasks["handle"].upstream_task_ids == {"jobs"}  # verify + train + answer in one task
    # the approval path hangs off `handle`: it expands to nothing when no job waits
    assert tasks["approval_requests"].upstream_task_ids == {"handle"}
    assert tasks["approve"].upstream_task_ids == {"approval_requests"}
    assert tasks["answer"].upstream_task_ids == {"approval_requests", "approve"}
    # a rejection or a timeout of `approve` must still reach `answer` (the signed refusal)
    assert tasks["answer"].trigger_rule == "all_done"
    assert tasks["summary"].trigger_rule == "all_done"
    assert tasks["summary"].upstream_task_ids == {"jobs", "handle", "answer"}
    for task_id in ("handle", "approve", "answer"):
        assert tasks[task_id].map_index_template, f"{task_id} is not labelled by its job"
