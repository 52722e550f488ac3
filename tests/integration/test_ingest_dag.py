"""The ingest DAG under ``dag.test()`` against real SeaweedFS + OpenBao: more drops than Airflow maps are
ingested in batches, a quarantined drop fails its task at once and the run (with the reasons in the
summary), the staged drops of the same run are still announced, and the grid names partner/key."""

from __future__ import annotations

import os

import pytest

from lepton_tasks.ingest.stage import already_ingested, staged_manifests
from lepton_tasks.ops.partners import drop_as_partner
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADER = "customer_id,student,balance,income,default"


def banks_csv(start: int, n: int = 60) -> bytes:
    rows = [
        f"c{i:05d},{'Yes' if i % 3 == 0 else 'No'},{100.0 + i:.2f},{20000 + 37 * i},"
        f"{'Yes' if i % 7 == 0 else 'No'}"
        for i in range(start, start + n)
    ]
    return ("\n".join([HEADER, *rows]) + "\n").encode()


@pytest.fixture(scope="module")
def ingest_dag(settings):
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    saved = {k: os.environ.get(k) for k in [*airflow_connections(settings), "LEPTON_DATA_DIR"]}
    os.environ.update(airflow_connections(settings))
    os.environ["LEPTON_DATA_DIR"] = str(settings.data_dir)
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.resetdb()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    yield bag.get_dag("lepton_ingest")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_batches_quarantine_fails_the_run_and_staged_drops_are_announced(
    ingest_dag, settings, onboard, admin_storage, monkeypatch, capfd
):
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    name = "dagt-a"
    onboard(name, ["banks"])
    drops = {
        "banks/bad.csv": b"customer_id,student,balance,income,default\nc1,No,12.5,abc,No\n",
        "banks/good-1.csv": banks_csv(0),
        "banks/good-2.csv": banks_csv(100),
        "banks/good-3.csv": banks_csv(200),
        "hospitals/x.csv": banks_csv(300),  # dagt-a is onboarded for banks only
    }
    for key, data in drops.items():
        drop_as_partner(settings, name, key, data)
    # 5 drops, and Airflow maps at most 3 here: without batches the mapping itself fails
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "3")

    run = ingest_dag.test(run_conf={"partner": name})

    assert run.state == "failed"  # was "success": the failed mapped task hid behind skipped leaves
    with create_session() as session:
        tis = {
            (ti.task_id, ti.map_index): ti
            for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)
        }
    ingest = sorted((k[1], ti) for k, ti in tis.items() if k[0] == "ingest")
    assert [(ti.rendered_map_index, ti.state, ti.try_number) for _, ti in ingest] == [
        (f"{name}/banks/bad.csv (+1 more)", "failed", 1),  # bad data: failed at once, no retry
        (f"{name}/banks/good-2.csv (+1 more)", "success", 1),
        (f"{name}/hospitals/x.csv", "failed", 1),
    ]
    assert tis[("summary", -1)].state == "failed"
    assert tis[("announce_banks", -1)].state == "success"
    assert tis[("announce_hospitals", -1)].state == "skipped"
    logs = "".join(capfd.readouterr())
    assert "2 of 5 drop(s) were not staged" in logs
    assert f"{name}/banks/bad.csv: quarantined: [wrong_type]" in logs
    assert f"partner {name} is onboarded for datasets [banks]; this drop is for hospitals" in logs

    # the staged drops of the failed batch were announced too, and are handled now
    assert len(staged_manifests(admin_storage, settings, "banks", [name])[name]) == 3
    inbox = settings.inbox_bucket(name)
    for key in ("banks/good-1.csv", "banks/good-2.csv", "banks/good-3.csv"):
        etag = admin_storage.stat(inbox, key).etag
        assert already_ingested(admin_storage, settings, name, key, etag) is not None, key
    for key in ("banks/bad.csv", "hospitals/x.csv"):
        assert not admin_storage.exists(inbox, key)  # moved to the partner's quarantine

    # nothing new left for this partner: the next sweep maps over no batch and ends green
    assert ingest_dag.test(run_conf={"partner": name}).state == "success"
