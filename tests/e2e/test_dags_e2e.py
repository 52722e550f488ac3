"""End to end under ``dag.test()``: the ingest DAG (what every site runs) on each scenario's drops, each
drop staged with a manifest that verifies. (Training end to end, a coordinator and its sites:
tests/e2e/test_topology_e2e.py.)"""

from __future__ import annotations

import os

import pytest

from lepton_tasks.adapters.manifest import read_manifest
from lepton_tasks.ingest.stage import staged_manifests
from lepton_tasks.ops.demo import partner_name
from lepton_tasks.ops.partners import drop_as_partner
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def airflow_db(settings, services):
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    # the DAGs run with Airflow's own least-privilege S3 identity, as in the embedded stack
    os.environ.update(airflow_connections(services.airflow_settings()))
    os.environ["LEPTON_DATA_DIR"] = str(settings.data_dir)
    from airflow.utils import db

    db.resetdb()
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    yield bag
    os.environ.pop("LEPTON_DATA_DIR", None)


@pytest.mark.parametrize("scenario", ["hospitals", "ecommerce", "banks"])
def test_ingest_dag_stages_each_scenario(
    scenario, airflow_db, settings, onboard, admin_storage, operator_vault
):
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    sc = SCENARIOS[scenario]
    frames = sc.generate(11, **({"rows_per_partner": 400} if scenario == "ecommerce" else {}))
    dag = airflow_db.get_dag("lepton_ingest")
    for raw, df in frames.items():
        name = partner_name(raw)
        onboard(name, [sc.dataset])
        drop_as_partner(settings, name, f"{sc.dataset}/e2e.csv", to_csv_bytes(df))
        run = dag.test(run_conf={"partner": name, "object_key": f"{sc.dataset}/e2e.csv"})
        assert run.state == "success", f"ingest of {name} ended {run.state}"
    found = staged_manifests(admin_storage, settings, sc.dataset, [partner_name(p) for p in frames])
    assert set(found) == {partner_name(p) for p in frames}
    for partner, keys in found.items():
        m = read_manifest(admin_storage, settings, operator_vault, partner, keys[-1], sc.dataset)
        assert m.dataset == sc.dataset and m.contract.startswith(f"{sc.dataset}@v")
        assert m.rows.train + m.rows.holdout > 0
        assert set(m.objects) == {"train", "holdout"}
