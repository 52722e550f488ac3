"""DAG integrity: every DAG file imports, has tags, retries >= 2 and docs, imports nothing heavy at parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((REPO / "dags").glob("*.py"))
HEAVY = ("tensorflow", "great_expectations", "pandas", "pyarrow", "sklearn", "matplotlib", "tink")


ROLES = ("single", "site", "coordinator")


@pytest.fixture(scope="module")
def dagbags() -> dict[str, Any]:
    """The DAG folder as the Airflow of each role loads it (``LEPTON_ROLE``)."""
    from airflow.dag_processing.dagbag import DagBag

    bags = {}
    for role in ROLES:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LEPTON_ROLE", role)
            bags[role] = DagBag(dag_folder=str(REPO / "dags"))
    return bags


@pytest.fixture(scope="module")
def dagbag(dagbags) -> SimpleNamespace:
    """Every DAG of every role (for the checks every DAG must pass)."""
    dags: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for bag in dagbags.values():
        dags |= bag.dags
        errors |= bag.import_errors
    return SimpleNamespace(dags=dags, import_errors=errors)


def test_each_role_loads_only_its_dags(dagbags):
    """A coordinator's Airflow has no ingest and no trainer DAG; a site's has no coordinator DAG; the
    single (development) stack only ingests: no Airflow trains except through the coordinator's run."""
    assert set(dagbags["single"].dags) == {"lepton_ingest"}
    assert set(dagbags["site"].dags) == {"lepton_ingest", "lepton_site"}
    assert set(dagbags["coordinator"].dags) == {"lepton_federated"}


def test_dag_files_are_the_topologys():
    """The only training path is the coordinator's DAG and the sites' job DAG (stage 1's per-dataset
    training DAGs are gone)."""
    assert {p.stem for p in DAG_FILES} == {"lepton_ingest", "lepton_site", "lepton_federated"}


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_every_dag_is_documented_tagged_and_retried(dagbag):
    assert dagbag.dags
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "lepton" in dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        for t in dag.tasks:
            assert (t.retries or 0) >= 2, f"{dag_id}.{t.task_id} has retries={t.retries}"


def test_the_federated_dag_waits_deferred_and_fails_once(dagbag):
    """Each round waits in a deferrable operator; a failure anywhere marks publish upstream-failed (the run
    ends failed) while the later steps skip; rounds beyond MAX_ROUNDS do not exist."""
    from lepton_airflow.answers_trigger import CollectAnswersOperator

    dag = dagbag.dags["lepton_federated"]
    groups = ["statistics", *(f"round_{k}" for k in range(1, 9)), "evaluation"]
    assert [t.task_id for t in dag.tasks if t.task_id.endswith(".collect")] == [
        f"{g}.collect" for g in groups
    ]
    for g in groups:
        assert isinstance(dag.get_task(f"{g}.collect"), CollectAnswersOperator)
        # a send runs after a failure (to skip naming it) but a round after a skipped round skips unrun
        rule = "none_skipped" if g.startswith("round_") else "all_done"
        assert dag.get_task(f"{g}.send").trigger_rule == rule, g
    assert dag.get_task("evaluation.send").upstream_task_ids == {f"{g}.collect" for g in groups[:-1]}
    publish = dag.get_task("publish")
    assert publish.trigger_rule == "none_failed"
    assert publish.upstream_task_ids == {t.task_id for t in dag.tasks} - {"publish"}
    assert set(dag.params) >= {
        "dataset",
        "sites",
        "rounds",
        "strategy",
        "min_partners",
        "round_deadline_minutes",
    }


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_fast_without_heavy_imports(path):
    code = f"""
import sys, time
sys.path.insert(0, {str(REPO / "plugins")!r})
import airflow.sdk  # the SDK itself is not what we measure
t = time.perf_counter()
import runpy
runpy.run_path({str(path)!r})
elapsed = time.perf_counter() - t
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(f"{{elapsed:.3f}} {{','.join(heavy)}}")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    elapsed_s, _, heavy = out.stdout.strip().splitlines()[-1].partition(" ")
    # behaviour, not time (a loaded machine makes any time bound flaky): no heavy module at parse time
    assert heavy == "", f"{path.name} imports {heavy} at parse time (took {elapsed_s}s)"


def test_the_federated_dag_runs_on_the_sites_announcements_or_a_cron(dagbag):
    """Off by default (UI/REST only: a run on the first announcement would start before the other sites
    staged); with ``LEPTON_FEDERATED_ON_ANNOUNCEMENTS=true`` scheduled on the ``lepton-announcements`` Asset
    (its watcher verifies the sites' signed announcements), and with ``LEPTON_FEDERATED_CRON`` also on that
    cron, the Params' defaults."""
    from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule

    dag = dagbag.dags["lepton_federated"]
    assert getattr(dag.timetable, "asset_condition", None) is None  # the default: no announcement starts it

    code = f"""
import os, sys, runpy
sys.path.insert(0, {str(REPO / "plugins")!r})
os.environ["LEPTON_ROLE"] = "coordinator"
os.environ["LEPTON_FEDERATED_CRON"] = "0 3 * * 1"
os.environ["LEPTON_FEDERATED_ON_ANNOUNCEMENTS"] = "true"
ns = runpy.run_path({str(REPO / "dags" / "lepton_federated.py")!r})
[watcher] = ns["ANNOUNCEMENTS"].watchers
print(type(watcher.trigger).__name__)
s = ns["schedule"]()
print(type(s).__name__, s.asset_condition.name, s.timetable.expression)
print(type(ns["schedule"]("")).__name__)
off = ns["schedule"]("5 4 * * *", False)
print(type(ns["schedule"]("", on_announcements=False)).__name__, off.expression)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    trigger, with_cron, without, off = out.stdout.strip().splitlines()[-4:]
    assert trigger == "AnnouncementsTrigger"
    assert with_cron == f"{AssetOrTimeSchedule.__name__} lepton-announcements 0 3 * * 1"
    assert without == "Asset"
    assert off == "NoneType 5 4 * * *"  # LEPTON_FEDERATED_ON_ANNOUNCEMENTS=false: the cron alone, or none
