"""The site's trainer run: a hardened container whose secrets are minted at execute time.

:func:`run_trainer` runs inside a site's job task (``dags/lepton_site.py``, through :func:`trainer_runner`;
never at parse time, never in XCom). It first probes Vault (``sys/health``) and S3 (one HEAD, no retries):
when either is down, it fails at once with one message naming the service and its address (``ServicesDown``,
transient: the task's retries with exponential backoff apply), before any token is minted or container
started. Then it builds the partner's job for the site's local run (``lepton_tasks.site.local_run``:
presigned URLs for that partner's objects only and a short-lived Vault token that can decrypt only that
partner's key, itself response-wrapped) and **response-wraps the whole job** (``sys/wrapping/wrap``, single
use, valid :data:`WRAP_TTL`). The container's environment holds only that wrapping token
(``LEPTON_JOB_TOKEN``) and the Vault address (``LEPTON_JOB_VAULT_ADDR``); the trainer unwraps it once at
start, so what ``docker inspect`` shows afterwards is a spent token: no presigned URL, no usable token. A
token nobody unwrapped (the trainer never started) is spent once the container ended.

The container (see :func:`container_spec`):

- runs the trainer image's non-root user on the trainers' own network (``LEPTON_TRAINER_NETWORK``, default
  ``lepton-trainers``: an internal bridge with no route out, created when missing). Embedded services bound
  to 127.0.0.1 are reached through the trainer gateway on that network's gateway address (the site's stack
  runs it), so the job's Vault address and presigned URLs name the gateway, not 127.0.0.1. ``host`` is
  still accepted (weaker: the container then shares the host's network namespace);
- has a read-only root file system with private tmpfs mounts for ``/tmp`` and its home (the work dir), no
  capabilities (``cap_drop=ALL``), ``no-new-privileges``, a memory limit without swap, a CPU limit and a
  pids limit (``LEPTON_TRAINER_MEMORY``, ``LEPTON_TRAINER_CPUS``);
- is removed once it ended, whatever the outcome (its environment held the job).

Before anything is minted, the image is checked against the trainer sources of this checkout: a stale image
fails the task at once (``run `lepton images build```) instead of failing inside the container. A failing
trainer's last stderr lines (scrubbed of presigned-URL signatures and tokens) are in the
:class:`TrainerFailed` it raises with the exit code; the site classifies it
(``lepton_tasks.site.training.trainer_refusal``: a bad job or a security failure is refused at once).

The Docker SDK creates the container itself (``apache-airflow-providers-docker``'s ``DockerOperator`` has no
parameter for a read-only root file system, ``cap_drop``, ``security_opt`` or tmpfs mounts, and takes its
private environment only at construction, while the job exists only at execute time).

Runtime: ``docker`` when a daemon answers and the trainer image exists; otherwise the explicit ``local``
runtime runs the same entrypoint (``python -m lepton_tasks.trainer``) as a subprocess, with a loud warning in
the task log. ``LEPTON_TRAINER_RUNTIME=docker`` makes a missing daemon an error.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from lepton_tasks.trainer.__main__ import JOB_TOKEN_ENV, JOB_VAULT_ENV, PLAIN_JOB_ENV

if TYPE_CHECKING:
    from lepton_tasks.site.training import TrainerFailed, TrainerRun, TrainerRunner

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``TrainerFailed`` (``lepton_tasks.site.training``), imported when first used: that module pulls in
    pandas, which DAG files importing this plugin must not load at parse time."""
    if name == "TrainerFailed":
        from lepton_tasks.site.training import TrainerFailed

        return TrainerFailed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the trainer's documented exit codes (see ``lepton_tasks.trainer.__main__``)
EXIT_MEANINGS = {1: "unexpected error", 2: "bad job", 3: "security failure", 4: "transient failure"}
#: how many of a failed trainer's last stderr lines go into the task's failure message
STDERR_TAIL_LINES = 20
#: how long the wrapping token in a container's environment can be unwrapped (the trainer does it at start)
WRAP_TTL = timedelta(minutes=5)
#: the trainer image's user and home (its WORKDIR)
TRAINER_USER = "10001:10001"
TRAINER_HOME = "/home/lepton"
PIDS_LIMIT = 1024
LABEL = "org.lepton.trainer"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

_SECRETS = [
    (re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"\b(?:s|hvs|hvb|b)\.[A-Za-z0-9_-]{20,}\b"), "[redacted-token]"),
]


def scrub(line: str) -> str:
    """``line`` without presigned-URL signatures or Vault tokens (a trainer's output is logged)."""
    for pattern, repl in _SECRETS:
        line = pattern.sub(repl, line)
    return line


def choose_runtime(settings) -> tuple[str, str]:
    """``(runtime, why)`` for this task: docker | local."""
    from lepton_tasks.ops.embedded.docker import docker_status

    if settings.trainer_runtime == "local":
        return "local", "LEPTON_TRAINER_RUNTIME=local"
    status = docker_status(settings.trainer_image)
    if status.available and status.trainer_image:
        return "docker", status.reason
    if settings.trainer_runtime == "docker":
        raise RuntimeError(f"LEPTON_TRAINER_RUNTIME=docker but Docker cannot run trainers: {status.reason}")
    return "local", status.reason


def _replace_host(netloc: str, host: str) -> str:
    port = netloc.rpartition(":")[2] if netloc.count(":") == 1 else ""
    return f"{host}:{port}" if port else host


def via_gateway(settings, gateway: str):
    """``settings`` whose loopback Vault and S3 addresses are replaced by ``gateway`` (the trainer network's
    gateway address, where the trainer gateway forwards to 127.0.0.1). Other addresses are left alone (in
    compose mode the services have names on the trainers' network)."""
    update: dict[str, str] = {}
    vault = urlsplit(settings.vault_addr)
    if vault.hostname in LOOPBACK:
        update["vault_addr"] = urlunsplit(vault._replace(netloc=_replace_host(vault.netloc, gateway)))
    s3_host = settings.s3_endpoint.rpartition(":")[0] or settings.s3_endpoint
    if s3_host in LOOPBACK:
        update["s3_endpoint"] = _replace_host(settings.s3_endpoint, gateway)
    return settings.model_copy(update=update) if update else settings


def container_spec(settings, *, network: str) -> dict[str, Any]:
    """Keyword arguments of ``APIClient.create_host_config`` for a trainer container."""
    mem = settings.trainer_memory
    spec: dict[str, Any] = {
        "network_mode": network,
        "read_only": True,
        "tmpfs": {
            "/tmp": "rw,noexec,nosuid,nodev,mode=1777",
            TRAINER_HOME: f"rw,noexec,nosuid,nodev,mode=0700,uid={TRAINER_USER.split(':')[0]},"
            f"gid={TRAINER_USER.split(':')[1]}",
        },
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": mem,
        "memswap_limit": mem,  # no swap beyond the limit (tmpfs pages count against it too)
        "nano_cpus": int(float(settings.trainer_cpus) * 1e9),
        "pids_limit": PIDS_LIMIT,
        "auto_remove": False,  # removed by run_trainer once its logs were read
        "privileged": False,
    }
    if settings.trainer_gpus:
        from docker.types import DeviceRequest

        spec["device_requests"] = [DeviceRequest(count=settings.trainer_gpus, capabilities=[["gpu"]])]
    return spec


class _WrappedTokenVault:
    """The site's Vault as :func:`~lepton_tasks.site.local_run.trainer_job` sees it: its
    ``trainer_token`` returns a *response-wrapped* trainer token (single use, valid :data:`WRAP_TTL`)."""

    def __init__(self, vault) -> None:
        self._vault = vault

    def trainer_token(self, partner: str, ttl: str = "1h") -> str:
        return self._vault.trainer_token_wrapped(
            partner, ttl=ttl, wrap_ttl=f"{int(WRAP_TTL.total_seconds())}s"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vault, name)


def require_services(settings) -> None:
    """Probe Vault and S3 (cheap, no retries); raise ``ServicesDown`` (transient) naming each one down."""
    from lepton_tasks.adapters.health import require_up
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import vault_health

    require_up(
        vault_health(settings.vault_addr),
        Storage.from_settings(settings).health(settings.models_bucket),
    )


def exited(partner: str, code: int, stderr_tail: list[str]) -> TrainerFailed:
    """The :class:`TrainerFailed` of a trainer that exited with ``code``: its last stderr lines, scrubbed."""
    from lepton_tasks.site.training import TrainerFailed

    meaning = EXIT_MEANINGS.get(code, "killed" if code >= 128 else "error")
    tail = [scrub(line) for line in stderr_tail[-STDERR_TAIL_LINES:]]
    text = "\n".join(tail) or "(no stderr output)"
    message = f"trainer for {partner} failed: {meaning} (exit code {code}); its last stderr lines:\n{text}"
    return TrainerFailed(message, exit_code=code, stderr_tail=tail)


def run_trainer(
    *,
    partner: str,
    mode: str,
    round_number: int,
    run_id: str,
    timeout: timedelta = timedelta(hours=1),
    docker_client: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Train (or evaluate) ``partner``'s model for the local run ``run_id`` in its own hardened container
    (or the local runtime), as described in the module docstring; returns what ran.

    ``timeout``: how long the job's presigned URLs and token live, and the local runtime's limit.
    ``docker_client``: makes the Docker ``APIClient`` to use, called only when the runtime is Docker (default:
    one for ``DOCKER_HOST``). Raises ``ServicesDown`` (transient) before anything is minted,
    ``AirflowFailException`` for a stale image, :class:`TrainerFailed` for a non-zero exit. It runs inside
    the calling task (a plain function: no operator is executed outside Airflow's task runner).
    """
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.site.local_run import trainer_job

    where = {"run_id": run_id, "mode": mode, "round_number": round_number, "partner": partner}
    hook = LeptonHook()
    settings = hook.get_settings()
    require_services(settings)  # before any token is minted or container started; retried
    runtime, why = choose_runtime(settings)
    args = ["--partner", partner, "--mode", mode, "--round", str(round_number)]
    log.info("trainer for %s (%s, round %s) runtime=%s (%s)", partner, mode, round_number, runtime, why)
    job_settings, network, cli = settings, None, None
    if runtime == "docker":
        from lepton_tasks.ops.embedded.docker import api_client

        cli = docker_client() if docker_client is not None else api_client()
        _check_image(cli, settings.trainer_image)  # before any secret is minted or container started
        job_settings, network = _network(cli, settings)
    vault = hook.get_vault()
    job = trainer_job(
        job_settings,
        Storage.from_settings(job_settings),
        _WrappedTokenVault(vault),
        run_id=run_id,
        partner=partner,
        mode=mode,
        round_number=round_number,
        ttl=timeout,
    ).model_copy(update={"vault_token_wrapped": True})
    # the whole job, response-wrapped: the environment holds a single-use token, spent at the start
    env = {
        JOB_TOKEN_ENV: vault.wrap({"job": job.model_dump_json()}, ttl=int(WRAP_TTL.total_seconds())),
        JOB_VAULT_ENV: job_settings.vault_addr,
    }
    try:
        if runtime == "docker":
            assert network is not None
            _run_container(cli, settings, network, args, env, where)
        else:
            run_local(args, env, timeout, why, partner)
    finally:
        _spend_job_token(settings.vault_addr, env[JOB_TOKEN_ENV])
    return {"partner": partner, "mode": mode, "round": round_number, "runtime": runtime}


def trainer_runner(*, timeout: timedelta = timedelta(hours=1)) -> TrainerRunner:
    """The site's ``TrainerRunner`` (``lepton_tasks.site.training``): :func:`run_trainer` for each
    :class:`TrainerRun`, inside the calling task."""

    def run(req: TrainerRun) -> None:
        run_trainer(
            partner=req.partner,
            mode=req.mode,
            round_number=req.round_number,
            run_id=req.run_id,
            timeout=timeout,
        )

    return run


def _spend_job_token(vault_addr: str, token: str) -> None:
    """Spend the job's wrapping token if the trainer never unwrapped it (it did not start, or crashed)."""
    from lepton_tasks.adapters.vault import VaultError, spend_if_unused

    try:
        if spend_if_unused(vault_addr, token):
            log.warning("the trainer never unwrapped its job: its wrapping token is now spent")
    except VaultError as exc:  # never mask the task's outcome; the token expires with WRAP_TTL anyway
        log.warning("could not check that the job's wrapping token is spent: %s", exc)


# docker -----------------------------------------------------------------------------------------------------
def _check_image(cli: Any, image: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from lepton_tasks.ops.images import StaleImageError, check_trainer_image

    try:
        log.info("%s", check_trainer_image(cli, image))
    except StaleImageError as exc:
        raise AirflowFailException(str(exc)) from exc


def _network(cli: Any, settings: Any) -> tuple[Any, str]:
    """(settings with the addresses a container uses, network name) for ``settings.trainer_network``."""
    from lepton_tasks.ops.embedded.docker import BUILTIN_NETWORKS, ensure_trainer_network

    name = settings.trainer_network
    if name in BUILTIN_NETWORKS:
        if name == "host":
            log.warning("trainer containers share the HOST network (LEPTON_TRAINER_NETWORK=host)")
        return settings, name
    net = ensure_trainer_network(name, client=cli)
    if not net.internal:
        log.warning("trainer network %s is not internal: its containers can reach other networks", name)
    if not net.gateway:
        return settings, name
    job_settings = via_gateway(settings, net.gateway)
    if job_settings is not settings:
        _require_gateway(job_settings, net.gateway)
    return job_settings, name


def _require_gateway(job_settings: Any, gateway: str) -> None:
    import socket

    for addr in (urlsplit(job_settings.vault_addr).netloc, job_settings.s3_endpoint):
        host, _, port = addr.rpartition(":")
        with socket.socket() as s:
            s.settimeout(3)
            if s.connect_ex((host, int(port))) != 0:
                raise RuntimeError(
                    f"nothing answers on the trainer network's gateway {addr}: the trainer gateway is "
                    f"not running; run `lepton up` (it forwards {gateway} to the services on 127.0.0.1)"
                )


def _run_container(
    cli: Any,
    settings: Any,
    network: str,
    args: list[str],
    env: dict[str, str],
    where: dict[str, Any],
) -> None:
    partner = where["partner"]
    host_config = cli.create_host_config(**container_spec(settings, network=network))
    container = cli.create_container(
        image=settings.trainer_image,
        command=args,
        environment=env,
        host_config=host_config,
        user=TRAINER_USER,
        working_dir=TRAINER_HOME,
        labels={
            LABEL: "1",
            f"{LABEL}.partner": partner,
            f"{LABEL}.mode": where["mode"],
            f"{LABEL}.round": str(where["round_number"]),
        },
    )
    cid = container["Id"]
    try:
        stream = cli.attach(container=cid, stdout=True, stderr=True, stream=True, logs=True)
        cli.start(cid)
        buffer = ""
        for chunk in stream:
            buffer += chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                log.info("trainer: %s", scrub(line.rstrip()))
        if buffer:
            log.info("trainer: %s", scrub(buffer.rstrip()))
        code = int(cli.wait(cid).get("StatusCode", -1))
        if code != 0:
            raw = cli.logs(cid, stdout=False, stderr=True, tail=STDERR_TAIL_LINES)
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
            raise exited(partner, code, text.splitlines())
    finally:
        try:
            cli.remove_container(cid, force=True)
        except Exception as exc:  # noqa: BLE001 - never mask the task's own outcome; logged
            log.warning("could not remove trainer container %s: %s", cid[:12], exc)


# local ------------------------------------------------------------------------------------------------------
def run_local(args: list[str], job: str | dict[str, str], ttl: timedelta, why: str, partner: str) -> None:
    """Run the trainer as a subprocess with the job's environment ``job`` (the wrapped job's variables), or
    a plain job JSON (``LEPTON_JOB``: tools and tests); :class:`TrainerFailed` for a non-zero exit."""
    log.warning(
        "!!! LOCAL RUNTIME: Docker is not available (%s); running the trainer as a subprocess "
        "of the Airflow worker. Partner isolation then relies on the scoped token only. !!!",
        why,
    )
    job_env = {PLAIN_JOB_ENV: job} if isinstance(job, str) else job
    drop = ("AIRFLOW_CONN_", "LEPTON_S3_", "LEPTON_VAULT_", "LEPTON_JOB", "VAULT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}  # nothing but its job
    env |= {**job_env, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "lepton_tasks.trainer", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=ttl.total_seconds(),
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        log.info("trainer: %s", scrub(line))
    if proc.returncode != 0:
        raise exited(partner, proc.returncode, proc.stderr.splitlines())
