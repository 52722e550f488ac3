"""End to end under ``dag.test()``: the ingest DAG on each scenario's drops, then the training DAG with real
DockerOperator trainer containers (3 partners, 2 rounds), one partner made to fail → excluded by the quorum rule."""

from __future__ import annotations

import os
import re

import pytest

from lepton_tasks.ingest.stage import read_manifest, staged_manifests
from lepton_tasks.ops.demo import partner_name
from lepton_tasks.ops.partners import drop_as_partner
from tests.conftest import REPO, need

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def airflow_db(settings):
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    os.environ.update(airflow_connections(settings))
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
        m = read_manifest(admin_storage, settings, operator_vault, partner, keys[-1])
        assert m["dataset"] == sc.dataset and m["contract"].startswith(f"{sc.dataset}@v")
        assert m["rows"]["train"] + m["rows"]["holdout"] > 0
        assert set(m["objects"]) == {"train", "holdout"}


def test_train_dag_in_docker_with_quorum(
    airflow_db, settings, admin_storage, root_vault, operator_vault, onboard, services, capfd
):
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.embedded.docker import docker_status
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    for raw, df in (
        SCENARIOS["hospitals"].generate(11).items()
    ):  # staged by the ingest test, or here if run alone
        name = partner_name(raw)
        if not staged_manifests(admin_storage, settings, "hospitals", [name]):
            onboard(name, ["hospitals"])
            drop_as_partner(settings, name, "hospitals/e2e.csv", to_csv_bytes(df))
            ingest_drop(settings, admin_storage, operator_vault, name, "hospitals/e2e.csv")

    status = docker_status()
    need(status.available and bool(status.trainer_image), f"Docker with the trainer image ({status.reason})")
    os.environ["LEPTON_TRAINER_RUNTIME"] = "docker"
    partners = [partner_name(p) for p in ("hospital_a", "hospital_b", "hospital_c")]
    failing = partners[2]
    policy = root_vault.client.sys.read_acl_policy(name=f"lepton-partner-{failing}")["data"]["policy"]
    root_vault.delete_policy(f"lepton-partner-{failing}")  # its trainer can no longer decrypt: it must fail
    try:
        dag = airflow_db.get_dag("lepton_train_hospitals")
        run = dag.test(
            run_conf={
                "partners": partners,
                "rounds": 2,
                "local_epochs": 2,
                "min_partners": 2,
                "learning_rate": 0.01,
                "batch_size": 32,
            }
        )
    finally:
        root_vault.write_policy(f"lepton-partner-{failing}", policy)
        os.environ.pop("LEPTON_TRAINER_RUNTIME", None)
    assert run.state == "success"
    logs = "".join(capfd.readouterr())
    assert "round_1" in logs and "trainer" in logs  # the task logs were captured
    secrets = [
        settings.vault_token.get_secret_value(),
        settings.s3_secret_key.get_secret_value(),
        services.openbao.root_token(),
    ]
    for secret in secrets:
        assert secret not in logs, "a secret leaked into the task logs"
    assert "X-Amz-Signature" not in logs, "a presigned URL leaked into the task logs"
    assert not re.search(r"\bs\.[A-Za-z0-9]{24}\b", logs), "a Vault token leaked into the task logs"
    prefix = f"{run.run_id}/"
    mb = settings.models_bucket
    for suffix in ("metrics.json", "report.html", "model/global.keras", "model/VERSION.json"):
        assert admin_storage.exists(mb, prefix + suffix), suffix
    metrics = admin_storage.get_json(mb, prefix + "metrics.json")
    assert metrics["runtime"] == "docker"
    assert [r["excluded"] for r in metrics["rounds"]] == [[failing], [failing]]
    assert set(metrics["final"]["per_partner"]) == set(partners[:2])
    assert set(metrics["local_only"]["per_partner"]) == set(partners[:2])
    assert metrics["final"]["overall"]["auc"] > 0.9
    assert set(metrics["lineage"]["drops"]) == set(partners)
    version = admin_storage.get_json(mb, prefix + "model/VERSION.json")
    assert version["version"] >= 1 and version["lineage"]["rounds"] == 2
    assert b"<html" in admin_storage.get_bytes(mb, prefix + "report.html")[:500].lower()
