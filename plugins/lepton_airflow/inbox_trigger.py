"""A polling event trigger over every partner inbox bucket (``inbox-*``).

No provider ships an S3/MinIO event trigger, so this one lists the inboxes every ``poll_interval`` seconds
(blocking SDK calls in a thread) and emits ONE event per poll carrying all drops to ingest — several events
at the same instant would be consumed by a single DAG run (apache/airflow#56050).

A key counts as handled only once ingest has recorded it (the ``_seen`` marker in staging, written when
the drop's data was announced for training), not when it was announced to the DAG: an announced key that
is still unhandled ``retry_after`` seconds later (10 min) is looked at again, and announced again unless an
ingest is at work on it right now (its live ``_inflight`` lease). So a drop whose ingest failed for a
transient reason (storage or Vault down, a worker lost) is retried by itself once the services are back,
with the wait doubling after each retry (up to 32x). What was announced and when is kept in the asset state
store (DB-backed): no duplicate and no missed drop across triggerer restarts. A daily scheduled sweep in the
ingest DAG reconciles anything missed anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)
STATE_KEY = "announced"
#: an announced key still unhandled after this long is checked, and announced again if nobody works on it
RETRY_AFTER_S = 600.0
#: the wait doubles after each retry of a key, at most this many times (10 min … 5 h 20 min)
MAX_DOUBLINGS = 5
#: at most this many unhandled keys are checked per poll (two small GETs each), the longest waiting first
MAX_CHECKS_PER_POLL = 200

DropState = str  # "handled" | "in_progress" | "pending" (lepton_tasks.ingest.stage.drop_state)


def scan_and_check() -> tuple[dict[str, dict[str, str]], Callable[[dict[str, str]], DropState]]:
    """Every object in every partner inbox (``{"partner/key": {"partner", "key", "etag", "modified"}}``)
    and the function telling whether ingest handled one, is at work on it, or neither (``stage.drop_state``).
    """
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.ingest.stage import drop_state, inbox_objects

    settings = LeptonHook.from_env()
    storage = Storage.from_settings(settings)
    found = {f"{d['partner']}/{d['key']}": d for d in inbox_objects(storage, settings)}

    def check(drop: dict[str, str]) -> DropState:
        return drop_state(storage, settings, drop["partner"], drop["key"], drop["etag"])

    return found, check


def _entry(raw: Any, now: float) -> dict[str, Any] | None:
    """One key's state; the pre-retry format (``{key: etag}``) reads as announced now, not yet handled."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"etag": raw, "modified": "", "at": now, "tries": 0, "handled": False}
    return dict(raw)


def _same_object(entry: dict[str, Any], drop: dict[str, str]) -> bool:
    """Same etag, and the same upload (a re-upload of identical bytes changes ``modified``)."""
    if entry["etag"] != drop["etag"]:
        return False
    return not entry.get("modified") or not drop.get("modified") or entry["modified"] == drop["modified"]


def poll(
    found: dict[str, dict[str, str]],
    state: dict[str, Any],
    now: float,
    check: Callable[[dict[str, str]], DropState],
    *,
    retry_after: float = RETRY_AFTER_S,
    max_checks: int = MAX_CHECKS_PER_POLL,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """One poll: ``(drops to announce, new state)``. ``found``: the inboxes now; ``check``: a drop's state.

    New keys and re-uploaded ones are announced. A key announced and still not handled after
    ``retry_after × 2^tries`` seconds is checked: handled → left alone from then on; an ingest at work on
    it → checked again later; neither → announced again. Deleted keys (quarantined drops) are forgotten.
    """
    announce: list[dict[str, str]] = []
    new: dict[str, Any] = {}
    due: list[str] = []
    for key, drop in sorted(found.items()):
        entry = _entry(state.get(key), now)
        if entry is None or not _same_object(entry, drop):
            announce.append(drop)
            new[key] = {
                "etag": drop["etag"],
                "modified": drop.get("modified", ""),
                "at": now,
                "tries": 0,
                "handled": False,
            }
            continue
        entry["modified"] = entry.get("modified") or drop.get("modified", "")
        new[key] = entry
        wait = retry_after * 2 ** min(int(entry.get("tries", 0)), MAX_DOUBLINGS)
        if not entry.get("handled") and now - float(entry.get("at", 0)) >= wait:
            due.append(key)
    for key in sorted(due, key=lambda k: new[k]["at"])[:max_checks]:
        status = check(found[key])
        if status == "handled":
            new[key]["handled"] = True
        elif status == "in_progress":
            new[key]["at"] = now
        else:
            log.warning(
                "%s was announced %.0f s ago and is still not ingested: announcing it again",
                key,
                now - new[key]["at"],
            )
            announce.append(found[key])
            new[key]["at"] = now
            new[key]["tries"] = int(new[key].get("tries", 0)) + 1
    return announce, new


def new_drops(found: dict[str, dict[str, str]], announced: dict[str, Any]) -> list[dict[str, str]]:
    """Drops not announced yet (new keys, changed content, re-uploads), in a stable order (no retries)."""
    drops, _ = poll(found, announced, time.time(), lambda _d: "handled", retry_after=float("inf"))
    return drops


class InboxTrigger(BaseEventTrigger):
    def __init__(self, poll_interval: float = 5.0, retry_after: float = RETRY_AFTER_S) -> None:
        super().__init__()
        self.poll_interval = poll_interval
        self.retry_after = retry_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "lepton_airflow.inbox_trigger.InboxTrigger",
            {"poll_interval": self.poll_interval, "retry_after": self.retry_after},
        )

    def _poll(self, state: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        found, check = scan_and_check()
        return poll(found, state, time.time(), check, retry_after=self.retry_after)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        store = self.asset_state_store
        state: dict[str, Any] = {}
        if store is not None:
            saved = await store.aget(STATE_KEY, {})
            state = dict(saved) if isinstance(saved, dict) else {}
        while True:
            try:
                drops, new_state = await asyncio.to_thread(self._poll, state)
            except Exception as exc:  # noqa: BLE001 - a transient S3 outage must not kill the watcher; logged
                log.warning("inbox scan failed, retrying in %ss: %s", self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            if new_state != state:
                state = new_state
                if store is not None:
                    await store.aset(STATE_KEY, state)
            if drops:
                log.info("announcing %d drop(s)", len(drops))
                yield TriggerEvent({"drops": drops})
            await asyncio.sleep(self.poll_interval)
