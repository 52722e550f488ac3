"""The site's trainer run (``lepton_airflow.trainer.run_trainer``, what a site's job task runs) against real
services and a real Docker daemon: the container it starts is hardened (read-only root, no capabilities,
no-new-privileges, memory/CPU/pids limits, the trainers' own network, not the host's); its whole job is
response-wrapped, so ``docker inspect`` shows no presigned URL and no usable token (the wrapping token in its
environment is spent by the trainer while it still runs); the container is gone afterwards; a stale image
fails before any container starts. Without Docker (real OpenBao): a wrapped job unwraps once, a spent or
substituted wrapping token is a security failure (exit 3), and a service that is down fails the try at once,
naming it, before any token is minted. Runs as a site's worker would, with Airflow's own connections (its
least-privilege S3 identity and the operator Vault token), on a one-partner local run. (How a site refuses
for exit codes 2/3: tests/unit/site/test_trainer_failures.py.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from lepton_tasks.ops.partners import drop_as_partner
from lepton_tasks.trainer.__main__ import JOB_TOKEN_ENV, JOB_VAULT_ENV, PLAIN_JOB_ENV
from tests.conftest import need

pytestmark = [pytest.mark.integration, pytest.mark.slow]
docker_only = pytest.mark.docker

PARTNER = "op-a"
RUN_ID = "trainer-container-1"
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
    """One hospital's drop staged under partner op-a and its one-partner local run."""
    from lepton_tasks.core.messages import HParams
    from lepton_tasks.ingest.stage import ingest_drop
    from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
    from tests.integration.local_plan import write_local_plan

    df = sorted(SCENARIOS["hospitals"].generate(5).items())[0][1]
    onboard(PARTNER, ["hospitals"])
    drop_as_partner(settings, PARTNER, "hospitals/op.csv", to_csv_bytes(df))
    ingest_drop(settings, admin_storage, operator_vault, PARTNER, "hospitals/op.csv")
    hp = HParams(rounds=1, local_epochs=1, batch_size=64, learning_rate=0.01, min_partners=1, seed=1)
    write_local_plan(
        settings,
        admin_storage,
        operator_vault,
        run_id=RUN_ID,
        partner=PARTNER,
        dataset="hospitals",
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


def _run(partner: str, mode: str = "local") -> dict:
    """What a site's job task runs for one trainer execution of local run :data:`RUN_ID`."""
    from lepton_airflow.trainer import run_trainer

    return run_trainer(partner=partner, mode=mode, round_number=0, run_id=RUN_ID)


class Inspector(threading.Thread):
    """Captures ``docker inspect`` of the trainer container of ``partner`` as soon as it exists, then (given
    ``vault_addr``) watches the job's wrapping token in its environment: ``spent_while`` is the container's
    state at the moment that token stopped being valid (``running``: the trainer spent it at its start)."""

    def __init__(self, client, partner: str, vault_addr: str | None = None) -> None:
        super().__init__(daemon=True)
        self.client, self.partner, self.attrs, self.done = client, partner, None, threading.Event()
        self.vault_addr, self.spent_while = vault_addr, None

    def run(self) -> None:
        container = None
        while not self.done.is_set() and self.attrs is None:
            found = self.client.containers.list(
                all=True, filters={"label": f"{LABEL}.partner={self.partner}"}
            )
            if found:
                container, self.attrs = found[0], found[0].attrs
            time.sleep(0.05)
        if container is None or self.vault_addr is None:
            return
        import docker.errors

        from lepton_tasks.adapters.vault import VaultError, lookup_wrapping

        env = dict(item.split("=", 1) for item in self.attrs["Config"]["Env"])
        token = env.get(JOB_TOKEN_ENV)
        while token and not self.done.is_set():
            try:
                lookup_wrapping(self.vault_addr, token, timeout=5)
            except VaultError:
                try:
                    container.reload()
                    self.spent_while = container.status
                except docker.errors.NotFound:
                    self.spent_while = "removed"
                return
            time.sleep(0.05)


def _trainer_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": LABEL})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


@docker_only
def test_container_is_hardened_and_docker_inspect_shows_nothing_usable(
    docker_client, planned, as_airflow, services, admin_storage, settings
):
    from lepton_tasks.adapters.vault import VaultError, lookup_wrapping, unwrap

    partner = PARTNER
    spy = Inspector(docker_client, partner, vault_addr=settings.vault_addr)
    spy.start()
    started = time.monotonic()
    try:
        result = _run(partner)
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
    # what `docker inspect` shows: the wrapping token of the job and where to unwrap it, nothing else of ours
    env = dict(item.split("=", 1) for item in config["Env"])
    assert {k for k in env if k.startswith(("LEPTON_", "VAULT_", "AWS_"))} == {JOB_TOKEN_ENV, JOB_VAULT_ENV}
    assert PLAIN_JOB_ENV not in env
    assert urlsplit(env[JOB_VAULT_ENV]).hostname == gateway
    inspect_text = json.dumps(spy.attrs)
    for secret_marker in ("X-Amz-", "Signature", "presigned", RUN_ID, settings.staging_bucket):
        assert secret_marker not in inspect_text, f"docker inspect shows {secret_marker!r}"
    assert inspect_text.count(env[JOB_TOKEN_ENV]) == 1  # the single-use wrapping token, once
    # ... and it is useless: the trainer spent it at its start, while it was still running
    assert spy.spent_while == "running", (
        f"the wrapping token was spent while the container was {spy.spent_while}"
    )
    with pytest.raises(VaultError, match="already used, expired or never issued"):
        unwrap(settings.vault_addr, env[JOB_TOKEN_ENV])
    with pytest.raises(VaultError):
        lookup_wrapping(settings.vault_addr, env[JOB_TOKEN_ENV])
    assert admin_storage.exists(settings.models_bucket, f"{RUN_ID}/local/{partner}.npz")
    assert _trainer_containers(docker_client) == [], "the trainer container was not removed"


@docker_only
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
            _run(PARTNER)
        assert _trainer_containers(docker_client) == []
    finally:
        docker_client.images.remove("lepton-trainer:stale-test", force=True)


# -- the wrapped job without Docker (real OpenBao) ---------------------------------------------------------
def test_a_wrapped_job_unwraps_once_and_a_spent_or_substituted_token_is_refused(
    services, settings, operator_vault, monkeypatch, capsys
):
    """The operator token may wrap (its policy has ``sys/wrapping/wrap``); the trainer unwraps the job once;
    the same token again, or a wrapping token created elsewhere, is a security failure (exit 3), and the
    substitute is refused *before* it is spent."""
    from lepton_tasks.adapters.vault import WRAP_CREATION_PATH, lookup_wrapping
    from lepton_tasks.trainer.__main__ import EXIT_SECURITY, SecurityError, main, read_job_env

    token = operator_vault.wrap({"job": '{"a": 1}'}, ttl=60)
    info = lookup_wrapping(settings.vault_addr, token)
    assert info["creation_path"] == WRAP_CREATION_PATH and int(info["creation_ttl"]) == 60
    env = {JOB_TOKEN_ENV: token, JOB_VAULT_ENV: settings.vault_addr}
    assert read_job_env(dict(env)) == ('{"a": 1}', "the wrapped job")
    with pytest.raises(SecurityError, match=r"already used, expired or never issued"):
        read_job_env(dict(env))  # single use

    substitute = operator_vault.trainer_token_wrapped("nobody", ttl="1m", wrap_ttl="60s")
    with pytest.raises(
        SecurityError, match=r"created at 'auth/token/create/lepton-trainer', not 'sys/wrapping/wrap'"
    ):
        read_job_env({JOB_TOKEN_ENV: substitute, JOB_VAULT_ENV: settings.vault_addr})
    assert lookup_wrapping(settings.vault_addr, substitute)  # refused without being spent

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(["--partner", PARTNER, "--mode", "local"]) == EXIT_SECURITY
    err = capsys.readouterr().err
    assert err.startswith("security error: the job could not be unwrapped") and token not in err


# -- the health probe: a service down fails the try at once, before any token ------------------------------
def _airflow_env(services, monkeypatch, **update) -> None:
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    for key, value in airflow_connections(services.airflow_settings().model_copy(update=update)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LEPTON_DATA_DIR", str(services.data_dir))
    monkeypatch.setenv("LEPTON_TRAINER_RUNTIME", "local")  # the probe comes before the runtime is chosen


def _token_accessors(root_vault) -> set[str]:
    """Accessors of the live tokens: compare sets, not counts (another test's token may expire meanwhile)."""
    return set(root_vault.client.auth.token.list_accessors()["data"]["keys"])


@pytest.mark.parametrize("down", ["vault", "s3"])
def test_a_service_down_fails_the_try_at_once_naming_it_before_any_token(
    down, services, settings, admin_storage, root_vault, monkeypatch
):
    from airflow.sdk.exceptions import AirflowFailException

    from lepton_tasks.adapters.health import ServicesDown

    port = _closed_port()
    address = f"http://127.0.0.1:{port}"
    if down == "vault":
        _airflow_env(services, monkeypatch, vault_addr=address)
    else:
        _airflow_env(services, monkeypatch, s3_endpoint=f"127.0.0.1:{port}")
    service = {"vault": "Vault", "s3": "S3"}[down]
    tokens = _token_accessors(root_vault)
    started = time.monotonic()
    with pytest.raises(ServicesDown) as err:
        _run("probe-p", mode="train")
    elapsed = time.monotonic() - started
    assert str(err.value) == (
        f"{service} at {address} is unreachable: [Errno 111] Connection refused; "
        "Airflow retries this task with backoff"
    )
    assert not isinstance(err.value, AirflowFailException)  # transient: the task's retries with backoff apply
    assert elapsed < 5, f"the probe took {elapsed:.1f}s"
    assert not _token_accessors(root_vault) - tokens, "a token was minted although a service was down"


def test_an_older_stacks_operator_policy_gets_job_wrapping_at_the_next_up(
    services, root_vault, operator_vault
):
    """A stack made before job wrapping: the operator token gets a clear error, and `lepton up` fixes it."""
    from lepton_tasks.adapters.vault import OPERATOR_POLICY, VaultError, operator_policy

    old = "\n".join(
        line
        for line in operator_policy(root_vault.transit_mount, services.settings().key_prefix).splitlines()
        if "sys/wrapping/wrap" not in line
    )
    root_vault.write_policy(OPERATOR_POLICY, old)
    try:
        with pytest.raises(VaultError, match=r"may not use sys/wrapping/wrap .* run `lepton up`"):
            operator_vault.wrap({"job": "{}"}, ttl=30)
    finally:
        services.up(with_airflow=False)
    assert operator_vault.wrap({"job": "{}"}, ttl=30)


def test_a_job_token_nobody_unwrapped_is_spent_after_the_run(settings, operator_vault):
    """What ``run_trainer`` does once a container ended: a token the trainer never unwrapped is spent then."""
    from lepton_tasks.adapters.vault import VaultError, lookup_wrapping, spend_if_unused, unwrap_data

    unused = operator_vault.wrap({"job": "{}"}, ttl=60)
    assert spend_if_unused(settings.vault_addr, unused) is True
    with pytest.raises(VaultError):
        lookup_wrapping(settings.vault_addr, unused)
    used = operator_vault.wrap({"job": "{}"}, ttl=60)
    assert unwrap_data(settings.vault_addr, used) == {"job": "{}"}
    assert spend_if_unused(settings.vault_addr, used) is False
