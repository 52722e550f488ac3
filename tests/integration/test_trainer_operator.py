"""LeptonTrainerOperator against real services and a real Docker daemon: the container it starts is hardened
(read-only root, no capabilities, no-new-privileges, memory/CPU/pids limits, the trainers' own network, not
the host's), its job's Vault token is response-wrapped and useless once the trainer used it, the container is
gone afterwards; a stale image fails before any container starts. Runs the operator's ``execute`` as
Airflow's worker would, with Airflow's own connections (its least-privilege S3 identity and the operator
Vault token). (Exit codes 2/3 → no retry: tests/unit/plugins/test_trainer.py and the e2e training DAG.)"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from lepton_tasks.ops.partners import drop_as_partner
from tests.conftest import need

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]

PARTNER = "op-a"
RUN_ID = "operator-test-1"
LABEL = "org.lepton.trainer"


@pytest.fixture(scope="module")
def docker_client():
    from lepton_tasks.ops.embedded.docker import docker_status

    status = docker_status()
    need(status.available, f"Docker with the trainer image ({status.reason})")
    import docker

    client = docker.from_env(version="auto", timeout=120)
    from lepton_tasks.ops.images import trainer_image_freshness

    fresh = trainer_image_freshness(client, "lepton-trainer:latest")
    need(not fresh.stale, f"a current trainer image ({fresh.reason})")
    yield client
    client.close()


@pytest.fixture(scope="module")
def planned(services, settings, admin_storage, operator_vault, onboard):
    """One hospital's drop staged under partner op-a and a planned run."""
    from lepton_tasks.federation.plan import HParams, plan_run
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

    df = sorted(SCENARIOS["hospitals"].generate(5).items())[0][1]
    onboard(PARTNER, ["hospitals"])
    drop_as_partner(settings, PARTNER, "hospitals/op.csv", to_csv_bytes(df))
    ingest_drop(settings, admin_storage, operator_vault, PARTNER, "hospitals/op.csv")
    hp = HParams(rounds=1, local_epochs=1, batch_size=64, learning_rate=0.01, min_partners=1, seed=1)
    plan_run(
        settings,
        admin_storage,
        operator_vault,
        run_id=RUN_ID,
        dataset="hospitals",
        partners=[PARTNER],
        hparams=hp,
    )
    return RUN_ID


@pytest.fixture
def as_airflow(services, monkeypatch):
    """The environment of an embedded Airflow worker: its connections and the stack's lepton.env."""
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    for key, value in airflow_connections(services.airflow_settings()).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LEPTON_DATA_DIR", str(services.data_dir))
    monkeypatch.setenv("LEPTON_TRAINER_RUNTIME", "docker")


def _operator(partner: str, mode: str = "local"):
    from lepton_airflow.trainer import LeptonTrainerOperator

    return LeptonTrainerOperator(task_id=f"t-{partner}-{mode}", partner=partner, mode=mode, run_id_=RUN_ID)


class Inspector(threading.Thread):
    """Captures ``docker inspect`` of the trainer container of ``partner`` while it runs."""

    def __init__(self, client, partner: str) -> None:
        super().__init__(daemon=True)
        self.client, self.partner, self.attrs, self.done = client, partner, None, threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.attrs is None:
            found = self.client.containers.list(
                all=True, filters={"label": f"{LABEL}.partner={self.partner}"}
            )
            if found:
                self.attrs = found[0].attrs
            time.sleep(0.05)


def _trainer_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": LABEL})


def test_container_is_hardened_and_its_wrapped_token_is_spent(
    docker_client, planned, as_airflow, services, admin_storage, settings
):
    from lepton_tasks.adapters.vault import VaultError, unwrap

    partner = PARTNER
    spy = Inspector(docker_client, partner)
    spy.start()
    started = time.monotonic()
    try:
        result = _operator(partner).execute(context={})
    finally:
        spy.done.set()
        spy.join(5)
    print(f"\ntrainer container (local-only model, {partner}): {time.monotonic() - started:.1f}s")
    assert result["runtime"] == "docker"
    assert spy.attrs is not None, "the trainer container was never seen"
    host, config = spy.attrs["HostConfig"], spy.attrs["Config"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges" in (host.get("SecurityOpt") or [])
    assert host["Privileged"] is False
    assert host["Memory"] == 4 * 2**30 and host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 10**9 and host["PidsLimit"] == 1024
    assert host["NetworkMode"] == "lepton-trainers" != "host"
    assert set(host["Tmpfs"]) == {"/tmp", "/home/lepton"}
    assert config["User"] == "10001:10001"
    net = docker_client.networks.get("lepton-trainers")
    assert net.attrs["Internal"] is True
    gateway = net.attrs["IPAM"]["Config"][0]["Gateway"]
    env = dict(item.split("=", 1) for item in config["Env"])
    job = json.loads(env["LEPTON_JOB"])
    assert job["vault_token_wrapped"] is True
    assert urlsplit(job["vault_addr"]).hostname == gateway
    assert urlsplit(job["output_url"]).hostname == gateway
    # what `docker inspect` showed cannot be used any more: the trainer unwrapped it once
    with pytest.raises(VaultError):
        unwrap(settings.vault_addr, job["vault_token"])
    assert admin_storage.exists(settings.models_bucket, f"{RUN_ID}/local/{partner}.npz")
    assert _trainer_containers(docker_client) == [], "the trainer container was not removed"


def test_stale_image_fails_before_any_container(docker_client, planned, as_airflow, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from lepton_tasks.ops.images import LABEL_HASH

    base = docker_client.images.get("lepton-trainer:latest")
    holder = docker_client.containers.create(base.id, entrypoint=["true"])
    try:
        holder.commit("lepton-trainer", "stale-test", conf={"Labels": {**base.labels, LABEL_HASH: "0" * 64}})
    finally:
        holder.remove(force=True)
    monkeypatch.setenv("LEPTON_TRAINER_IMAGE", "lepton-trainer:stale-test")
    try:
        with pytest.raises(
            AirflowFailException,
            match=r"trainer image lepton-trainer:000000000000 is stale \(sources hash to [0-9a-f]{12}\): "
            r"run `lepton images build`",
        ):
            _operator(PARTNER).execute(context={})
        assert _trainer_containers(docker_client) == []
    finally:
        docker_client.images.remove("lepton-trainer:stale-test", force=True)
