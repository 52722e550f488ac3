"""The embedded Airflow: every component starts, reports healthy, registers its DAG, binds 127.0.0.1 only,
keeps its admin password out of its logs, keeps its files private, survives a scheduler crash by restarting
only the scheduler (its orphaned workers stopped), and `stop` ends exactly its processes."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import psutil
import pytest

from lepton_tasks.ops.embedded.process import session_members

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _listen_addrs(pid: int) -> set[tuple[str, int]]:
    root = psutil.Process(pid)
    out = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return out


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.5)


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


@pytest.fixture(scope="module")
def airflow(services):
    af = services.airflow(services.settings())
    started = time.monotonic()
    assert af.start(timeout=240) is True
    print(f"\nembedded Airflow healthy after {time.monotonic() - started:.1f}s")
    try:
        yield af
    finally:
        af.stop()


def test_embedded_airflow_is_healthy_and_loopback_only(services, airflow):
    af, settings = airflow, services.settings()
    assert af.start() is False  # idempotent
    for name, proc in af.procs().items():
        addrs = _listen_addrs(proc.pid())
        assert all(ip == "127.0.0.1" for ip, _ in addrs), f"airflow {name} listens on {addrs}"
    assert ("127.0.0.1", settings.airflow_port) in _listen_addrs(af.procs()["api-server"].pid())
    assert af.admin_password()
    assert af.password_file().stat().st_mode & 0o077 == 0
    from lepton_tasks.ops.airflow_api import AirflowAPI

    api = AirflowAPI(af.url, "admin", af.admin_password())
    _wait(lambda: api.dag_exists("lepton_ingest"), 120, "the DAG registered by the dag-processor")
    with urllib.request.urlopen(f"{af.url}/api/v2/monitor/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["metadatabase"]["status"] == "healthy"
    # invalid Params are refused with a clear message
    from lepton_tasks.ops.airflow_api import AirflowAPIError

    with pytest.raises(AirflowAPIError, match="400"):
        api.trigger("lepton_ingest", {"partner": "Not A Partner!"})


def test_admin_password_is_in_no_log_and_files_are_private(services, airflow):
    password = airflow.admin_password()
    assert password and len(password) >= 16
    data_dir = services.data_dir
    leaks = []
    for path in data_dir.rglob("*"):
        readable = path.is_file() and path != airflow.password_file() and path.stat().st_size < 50 * 2**20
        if readable and password.encode() in path.read_bytes():
            leaks.append(str(path.relative_to(data_dir)))
    assert not leaks, f"the Airflow admin password is written in {leaks}"
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for d in ("logs", "run", "airflow"):
        assert (data_dir / d).stat().st_mode & 0o777 == 0o700, f"{d}/ is not 0700"
    private = [*data_dir.glob("logs/*"), *data_dir.glob("run/*"), *data_dir.glob("airflow/airflow.db*")]
    private.append(airflow.password_file())
    wide = [
        f"{p.relative_to(data_dir)} {p.stat().st_mode & 0o777:o}" for p in private if p.stat().st_mode & 0o077
    ]
    assert not wide, f"readable by others: {wide}"


def test_scheduler_crash_restarts_only_the_scheduler_and_its_workers_do_not_survive(services, airflow):
    procs = airflow.procs()
    before = {name: p.pid() for name, p in procs.items()}
    scheduler = before["scheduler"]
    _wait(lambda: len(session_members(scheduler)) > 1, 90, "the scheduler started LocalExecutor workers")
    workers = [p for p in session_members(scheduler) if p != scheduler]
    os.kill(scheduler, signal.SIGKILL)
    _wait(lambda: not procs["scheduler"].running(), 10, "the scheduler died")
    time.sleep(1)
    orphans = procs["scheduler"].leftovers()
    assert set(workers) <= set(orphans), "the crashed scheduler's workers are not found"
    leaked_mb = _rss_mb(orphans)
    started = time.monotonic()
    result = services.up()  # what `lepton up` does
    took = time.monotonic() - started
    print(
        f"\n`up` after a scheduler crash: {took:.1f}s; stopped {len(orphans)} orphans "
        f"({leaked_mb:.0f} MB RSS)"
    )
    assert {k for k, v in result.items() if v} == {"airflow-scheduler"}, result
    after = {name: p.pid() for name, p in procs.items()}
    assert after["scheduler"] not in (None, scheduler)
    assert {k: v for k, v in after.items() if k != "scheduler"} == {
        k: v for k, v in before.items() if k != "scheduler"
    }, "other components were restarted"
    assert session_members(scheduler) == [], "the crashed scheduler's workers survived `up`"
    assert airflow.healthy()


def test_stop_after_a_scheduler_crash_leaves_no_process(airflow):
    procs = airflow.procs()
    sessions = {name: p.pid() for name, p in procs.items()}
    scheduler = sessions["scheduler"]
    _wait(lambda: len(session_members(scheduler)) > 1, 90, "the scheduler started LocalExecutor workers")
    os.kill(scheduler, signal.SIGKILL)
    _wait(lambda: not procs["scheduler"].running(), 10, "the scheduler died")
    started = time.monotonic()
    stopped = airflow.stop()
    print(f"\nstop after a scheduler crash: {time.monotonic() - started:.1f}s")
    assert set(stopped) == set(procs)
    for name, sid in sessions.items():
        assert session_members(sid) == [], f"processes of airflow-{name} survived stop"
    assert not any(p.running() for p in procs.values())
