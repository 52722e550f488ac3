"""Build Lepton settings from Airflow Connections, resolved at execute time (never at parse time).

``lepton_s3`` (conn type aws: login/password = access/secret key, extra.endpoint_url) and ``lepton_vault``
(conn type vault: password = token, host/extra.url = address) are provided as ``AIRFLOW_CONN_*`` by
``lepton up`` (embedded) or docker-compose; no secret appears in DAG code.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlparse

S3_CONN_ID = "lepton_s3"
VAULT_CONN_ID = "lepton_vault"


def _overrides(s3: dict[str, Any], vault: dict[str, Any]) -> dict[str, Any]:
    endpoint = urlparse((s3.get("extra") or {}).get("endpoint_url", "http://127.0.0.1:8333"))
    vault_extra = vault.get("extra") or {}
    return {
        "s3_endpoint": endpoint.netloc,
        "s3_secure": endpoint.scheme == "https",
        "s3_access_key": s3.get("login") or "",
        "s3_secret_key": s3.get("password") or "",
        "vault_addr": vault_extra.get("url") or vault.get("host") or "",
        "vault_token": vault.get("password") or "",
        "transit_mount": vault_extra.get("transit_mount", "transit"),
    }


def _conn_dict(conn_id: str) -> dict[str, Any]:
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")
    return {"login": conn.login, "password": conn.password, "host": conn.host, "extra": extra}


def lepton_settings():
    """Settings for a task: the stack's defaults overlaid with the two connections."""
    from lepton_tasks.adapters.settings import load_settings

    return load_settings(**_overrides(_conn_dict(S3_CONN_ID), _conn_dict(VAULT_CONN_ID)))


def settings_from_env():
    """Settings in the triggerer (no task context): parse ``AIRFLOW_CONN_*`` JSON directly."""
    from lepton_tasks.adapters.settings import load_settings

    raw_s3, raw_vault = os.environ.get("AIRFLOW_CONN_LEPTON_S3"), os.environ.get("AIRFLOW_CONN_LEPTON_VAULT")
    if raw_s3 and raw_vault:
        return load_settings(**_overrides(json.loads(raw_s3), json.loads(raw_vault)))
    return load_settings()
