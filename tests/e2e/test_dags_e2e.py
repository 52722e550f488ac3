"""End to end under ``dag.test()``: the ingest DAG on each scenario's drops, then the training DAG with real
DockerOperator trainer containers (3 partners, 2 rounds), one partner made to fail → excluded with its
reason."""

from __future__ import annotations

import os
import re

import pytest

from lepton_tasks.federation.plan import read_manifest
from lepton_tasks.ingest.stage import staged_manifests
from lepton_tasks.ops.demo import partner_name
from lepton_tasks.ops.partners import drop_as_partner
from tests.conftest import REPO, need

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
    # the excluded partner is named in every round with the trainer's exact security message
    assert [list(r["excluded"]) for r in metrics["rounds"]] == [[failing], [failing]]
    for r in metrics["rounds"]:
        assert "security error" in r["excluded"][failing] and "denied" in r["excluded"][failing]
    assert set(metrics["final"]["per_partner"]) == set(partners[:2])
    assert set(metrics["local_only"]["per_partner"]) == set(partners[:2])
    assert metrics["final"]["overall"]["auc"] > 0.9
    assert set(metrics["lineage"]["drops"]) == set(partners[:2]), "lineage lists only what fed the model"
    version = admin_storage.get_json(mb, prefix + "model/VERSION.json")
    assert version["version"] >= 1 and version["lineage"]["rounds"] == 2
    report = admin_storage.get_bytes(mb, prefix + "report.html").decode()
    assert "<html" in report[:500].lower() and failing in report and "security error" in report
    _every_boundary_object_loads(admin_storage, settings, run.run_id)


def _every_boundary_object_loads(storage, settings, run_id: str) -> None:
    """Each object this real run wrote goes through its model (a drifted field fails here)."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.messages import (
        EvalResult,
        GlobalWeightsMeta,
        LocalModelMeta,
        ModelVersion,
        Plan,
        RegistryEntry,
        RoundSummary,
        RunMetrics,
        SignedManifest,
        UpdateMeta,
        load,
    )

    mb, prefix = settings.models_bucket, f"{run_id}/"
    seen: dict[str, int] = {}

    def check(model, raw, key):
        load(model, raw, where=key)
        seen[model.__name__] = seen.get(model.__name__, 0) + 1

    plan = load(Plan, storage.get_bytes(mb, prefix + "plan.json"), where="plan.json")
    for drops in plan.drops.values():
        for d in drops:
            check(SignedManifest, storage.get_bytes(settings.staging_bucket, d.manifest), d.manifest)
    for obj in storage.list(mb, prefix):
        key = obj.key
        if key.endswith(".update"):
            check(UpdateMeta, wio.loads(storage.get_bytes(mb, key))[1], key)
        elif key.endswith("/global.npz"):
            check(GlobalWeightsMeta, wio.loads(storage.get_bytes(mb, key))[1], key)
        elif "/local/" in key and key.endswith(".npz"):
            check(LocalModelMeta, wio.loads(storage.get_bytes(mb, key))[1], key)
        elif key.endswith("summary.json"):
            check(RoundSummary, storage.get_bytes(mb, key), key)
        elif "/eval/" in key:
            check(EvalResult, storage.get_bytes(mb, key), key)
        elif key.endswith("metrics.json"):
            check(RunMetrics, storage.get_bytes(mb, key), key)
        elif key.endswith("VERSION.json"):
            check(ModelVersion, storage.get_bytes(mb, key), key)
    for obj in storage.list(mb, f"_registry/{plan.dataset}/"):
        check(RegistryEntry, storage.get_bytes(mb, obj.key), obj.key)
    expected = {"SignedManifest", "UpdateMeta", "GlobalWeightsMeta", "LocalModelMeta", "RoundSummary"}
    expected |= {"EvalResult", "RunMetrics", "ModelVersion", "RegistryEntry"}
    assert expected <= set(seen), f"no real object of {expected - set(seen)} was found"
