"""The embedded Airflow: every component starts, reports healthy, registers both DAGs, binds 127.0.0.1 only,
and `stop` ends exactly its processes."""

from __future__ import annotations

import json
import urllib.request

import psutil
import pytest

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


def test_embedded_airflow_is_healthy_and_loopback_only(services):
    settings = services.settings()
    af = services.airflow(settings)
    try:
        assert af.start(timeout=240) is True
        assert af.start() is False  # idempotent
        for name, proc in af.procs().items():
            addrs = _listen_addrs(proc.pid())
            assert all(ip == "127.0.0.1" for ip, _ in addrs), f"airflow {name} listens on {addrs}"
        assert ("127.0.0.1", settings.airflow_port) in _listen_addrs(af.procs()["api-server"].pid())
        assert af.admin_password()
        assert af.password_file().stat().st_mode & 0o077 == 0
        from lepton_tasks.ops.airflow_api import AirflowAPI

        api = AirflowAPI(af.url, "admin", af.admin_password())
        import time

        deadline = time.monotonic() + 120
        while not (
            api.dag_exists("lepton_ingest")
            and all(api.dag_exists(f"lepton_train_{d}") for d in ("banks", "hospitals", "ecommerce"))
        ):
            assert time.monotonic() < deadline, "DAGs not registered by the dag-processor within 120 s"
            time.sleep(3)
        with urllib.request.urlopen(f"{af.url}/api/v2/monitor/health", timeout=30) as resp:
            health = json.loads(resp.read())
        assert health["metadatabase"]["status"] == "healthy"
        # invalid Params are refused with a clear message
        from lepton_tasks.ops.airflow_api import AirflowAPIError

        with pytest.raises(AirflowAPIError, match="400"):
            api.trigger("lepton_train_banks", {"rounds": 0})
    finally:
        stopped = af.stop()
    assert sorted(stopped) == sorted(af.procs())
    assert not any(p.running() for p in af.procs().values())
