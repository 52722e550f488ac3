"""A minimal client of Airflow 3's REST API (v2) for the CLI and the demo: token, trigger, wait."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential


class AirflowAPIError(RuntimeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _transient(exc: BaseException) -> bool:
    """SQLite (the embedded metadata DB) answers a busy lock with HTTP 500 'Database error': retry those."""
    return isinstance(exc, AirflowAPIError) and exc.status == 500 and "Database error" in str(exc)


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 60.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self._token = self._post("/auth/token", {"username": username, "password": password}, auth=False)[
            "access_token"
        ]

    @retry(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(5),
        wait=wait_exponential(0.5, max=8),
        reraise=True,
    )
    def _req(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise AirflowAPIError(
                f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}", exc.code
            ) from exc
        return json.loads(raw) if raw else None

    def _post(self, path: str, body: Any, auth: bool = True) -> Any:
        return self._req("POST", path, body, auth)

    def unpause(self, dag_id: str) -> None:
        self._req("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self._post(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self._req("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=50&order_by=-run_after")["dag_runs"]

    def dag_exists(self, dag_id: str) -> bool:
        try:
            self._req("GET", f"/api/v2/dags/{dag_id}")
        except AirflowAPIError:
            return False
        return True

    def wait_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self._req("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run["state"]
            time.sleep(poll)
        raise AirflowAPIError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s")
