"""A polling event trigger over every partner inbox bucket (``inbox-*``).

No provider ships an S3/MinIO event trigger, so this one lists the inboxes every ``poll_interval`` seconds
(blocking SDK calls in a thread) and emits ONE event per poll carrying all new drops — several events at
the same instant would be consumed by a single DAG run (apache/airflow#56050). What was already announced
is kept in the asset state store (DB-backed): no duplicate and no missed drop across triggerer restarts.
A daily scheduled sweep in the ingest DAG reconciles anything missed anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)
STATE_KEY = "announced"


def scan_inboxes() -> dict[str, dict[str, str]]:
    """``{"partner/key": {"partner", "key", "etag"}}`` for every object in every partner inbox."""
    from lepton_airflow.connections import settings_from_env
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ingest.stage import inbox_objects

    settings = settings_from_env()
    return {f"{d['partner']}/{d['key']}": d for d in inbox_objects(Storage.from_settings(settings), settings)}


def new_drops(found: dict[str, dict[str, str]], announced: dict[str, str]) -> list[dict[str, str]]:
    """Drops whose (key, etag) was not announced yet, in a stable order."""
    return [d for k, d in sorted(found.items()) if announced.get(k) != d["etag"]]


class InboxTrigger(BaseEventTrigger):
    def __init__(self, poll_interval: float = 5.0) -> None:
        super().__init__()
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("lepton_airflow.inbox_trigger.InboxTrigger", {"poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        store = self.asset_state_store
        announced: dict[str, str] = {}
        if store is not None:
            announced = dict(await store.aget(STATE_KEY, {}) or {})
        while True:
            try:
                found = await asyncio.to_thread(scan_inboxes)
            except Exception as exc:  # noqa: BLE001 - a transient S3 outage must not kill the watcher; logged
                log.warning("inbox scan failed, retrying in %ss: %s", self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            drops = new_drops(found, announced)
            if drops:
                announced = {k: d["etag"] for k, d in found.items()}  # forget deleted keys
                if store is not None:
                    await store.aset(STATE_KEY, announced)
                log.info("announcing %d new drop(s)", len(drops))
                yield TriggerEvent({"drops": drops})
            await asyncio.sleep(self.poll_interval)
