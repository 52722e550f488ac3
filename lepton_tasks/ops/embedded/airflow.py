"""Airflow 3.3 for the embedded stack: api-server, scheduler, dag-processor and triggerer on 127.0.0.1.

The components are started one by one rather than with ``airflow standalone`` because standalone binds
0.0.0.0 and cannot pass ``--skip-serve-logs``: the scheduler's and triggerer's log servers would listen on
all interfaces. On one machine the api-server reads task logs from local files, so nothing is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.ops.embedded.process import ManagedProcess, ServiceError, require_ports_free, wait_until

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def airflow_connections(settings: Settings) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` values for S3 and Vault (JSON form), built from the stack's settings."""
    scheme = "https" if settings.s3_secure else "http"
    s3 = {
        "conn_type": "aws",
        "login": settings.s3_access_key,
        "password": settings.s3_secret_key.get_secret_value(),
        "extra": {"endpoint_url": f"{scheme}://{settings.s3_endpoint}", "region_name": settings.s3_region},
    }
    vault = {
        "conn_type": "vault",
        "host": settings.vault_addr,
        "password": settings.vault_token.get_secret_value(),
        "extra": {"auth_type": "token", "url": settings.vault_addr, "transit_mount": settings.transit_mount},
    }
    return {"AIRFLOW_CONN_LEPTON_S3": json.dumps(s3), "AIRFLOW_CONN_LEPTON_VAULT": json.dumps(vault)}


@dataclass
class EmbeddedAirflow:
    settings: Settings
    repo_root: Path

    @property
    def home(self) -> Path:
        return self.settings.data_dir / "airflow"

    @property
    def url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.airflow_port}"

    def procs(self) -> dict[str, ManagedProcess]:
        return {c: ManagedProcess(f"airflow-{c}", self.settings.data_dir / "run") for c in COMPONENTS}

    def env(self) -> dict[str, str]:
        s = self.settings
        parallelism = max(2, min(8, (os.cpu_count() or 2) * 2))
        env = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo_root / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.repo_root / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__API__HOST": s.bind_host,
            "AIRFLOW__API__PORT": str(s.airflow_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "LEPTON_DATA_DIR": str(s.data_dir),
            "PYTHONPATH": f"{self.repo_root}:{self.repo_root / 'plugins'}",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        env.update(airflow_connections(s))
        return env

    def _airflow(self) -> str:
        binary = shutil.which("airflow")
        if binary is None:
            raise ServiceError("airflow: the `airflow` command is missing; install the pinned requirements")
        return binary

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                data = json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            return False
        return all(
            (data.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "triggerer")
        )

    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def admin_password(self) -> str | None:
        f = self.password_file()
        if not f.is_file():
            return None
        return json.loads(f.read_text()).get("admin")

    def start(self, timeout: float = 180.0) -> bool:
        procs = self.procs()
        if all(p.running() for p in procs.values()):
            return False
        for p in procs.values():  # a partial stack from a crash: restart it cleanly
            p.stop()
        require_ports_free("airflow api-server", self.settings.bind_host, [self.settings.airflow_port])
        self.home.mkdir(parents=True, exist_ok=True)
        # a clean Airflow environment: nothing AIRFLOW_* inherited from the caller (e.g. a test session's config)
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env = {**base, **self.env()}
        log = self.settings.data_dir / "logs" / "airflow-db-migrate.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            rc = subprocess.run(
                [self._airflow(), "db", "migrate"],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=600,
            ).returncode
        if rc != 0:
            raise ServiceError(f"airflow: `airflow db migrate` failed; see {log}")
        flags = {"scheduler": ["--skip-serve-logs"], "triggerer": ["--skip-serve-logs"]}
        for comp, proc in procs.items():
            proc.start(
                [self._airflow(), comp, *flags.get(comp, [])], env=self.env(), cwd=self.home, base_env=base
            )
        wait_until(self.healthy, service="airflow", timeout=timeout, proc=procs["api-server"], interval=1.0)
        if self.password_file().exists():
            os.chmod(self.password_file(), 0o600)
        return True

    def stop(self) -> list[str]:
        return [name for name, p in self.procs().items() if p.stop()]
