"""The embedded stack: idempotent `up`, loopback-only binding, clear error for a taken port, clean `down`."""

from __future__ import annotations

import socket

import psutil
import pytest

from lepton_tasks.ops.embedded.process import ServiceError

pytestmark = pytest.mark.integration


def test_up_twice_changes_nothing(services):
    pids = {r["service"]: r["pid"] for r in services.status()}
    env_before = services.settings().env_file.read_text()
    assert services.up(with_airflow=False) == {"openbao": False, "seaweedfs": False}
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
        assert stack.down() == ["seaweedfs", "openbao"]
        assert not psutil.pid_exists(bao_pid) or psutil.Process(bao_pid).status() == psutil.STATUS_ZOMBIE
        assert decoy.poll() is None, "down() killed a process it did not start"
        assert port_free("127.0.0.1", stack.ports.vault) and port_free("127.0.0.1", stack.ports.s3)
        assert stack.down() == []
    finally:
        decoy.kill()
        decoy.wait()
