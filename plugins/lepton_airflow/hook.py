"""``LeptonHook``: the one place Airflow Connections become Lepton's settings, storage and Vault clients.

``lepton_s3`` (conn type aws: login/password = access/secret key, extra.endpoint_url) and ``lepton_vault``
(conn type vault: password = token, host/extra.url = address, extra.transit_mount) are provided as
``AIRFLOW_CONN_*`` by ``lepton up`` (embedded) or docker-compose; no secret appears in DAG code. Resolved at
execute time, never at parse time. Like the providers' hooks, it only builds clients: the logic lives in the
Airflow-free ``lepton_tasks`` (``adapters.storage.Storage``, ``adapters.vault.Vault``).

Why not the hashicorp provider's ``VaultHook``: it builds its own hvac client from host/port/schema and knows
nothing of the transit mount and the per-partner key naming that ``Vault`` needs, and the triggerer (no task
context) must build the same settings from the environment. So the provider is not used (and not pinned).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault

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


class LeptonHook(BaseHook):
    """Settings, S3 storage and Vault clients from the ``lepton_s3`` and ``lepton_vault`` connections.

    In a task, the connections come through Airflow (any secrets backend); in the triggerer, which has no
    task context, use :meth:`from_env`, which parses the ``AIRFLOW_CONN_*`` JSON directly.
    """

    conn_name_attr = "s3_conn_id"
    hook_name = "Lepton"

    def __init__(self, s3_conn_id: str = S3_CONN_ID, vault_conn_id: str = VAULT_CONN_ID) -> None:
        super().__init__()
        self.s3_conn_id = s3_conn_id
        self.vault_conn_id = vault_conn_id
        self._settings: Settings | None = None

    @staticmethod
    def _conn_dict(conn_id: str) -> dict[str, Any]:
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
        extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")
        return {"login": conn.login, "password": conn.password, "host": conn.host, "extra": extra}

    def get_settings(self) -> Settings:
        """The stack's defaults overlaid with the two connections (built once per hook)."""
        if self._settings is None:
            from lepton_tasks.adapters.settings import load_settings

            self._settings = load_settings(
                **_overrides(self._conn_dict(self.s3_conn_id), self._conn_dict(self.vault_conn_id))
            )
        return self._settings

    def get_storage(self, settings: Settings | None = None) -> Storage:
        from lepton_tasks.adapters.storage import Storage

        return Storage.from_settings(settings or self.get_settings())

    def get_vault(self) -> Vault:
        """A Vault client with the operator token of the ``lepton_vault`` connection."""
        from lepton_tasks.adapters.vault import Vault

        s = self.get_settings()
        return Vault.connect(s.vault_addr, s.vault_token.get_secret_value(), s.transit_mount)

    def get_conn(self) -> Storage:
        return self.get_storage()

    @staticmethod
    def from_env() -> Settings:
        """Settings in the triggerer (no task context): parse ``AIRFLOW_CONN_*`` JSON directly."""
        from lepton_tasks.adapters.settings import load_settings

        raw_s3 = os.environ.get("AIRFLOW_CONN_LEPTON_S3")
        raw_vault = os.environ.get("AIRFLOW_CONN_LEPTON_VAULT")
        if raw_s3 and raw_vault:
            return load_settings(**_overrides(json.loads(raw_s3), json.loads(raw_vault)))
        return load_settings()
