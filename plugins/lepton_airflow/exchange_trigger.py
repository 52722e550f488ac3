"""The site's exchange watcher: a polling event trigger over the site's OWN exchange bucket.

Outbound only: the site connects to the coordinator's object storage with the bucket-scoped credentials of
its enrollment bundle (``<site dir>/enrollment.json``, :class:`~lepton_tasks.site.enrollment.SiteFiles`) and
lists ``jobs/`` there (:func:`lepton_tasks.site.jobs.poll_jobs`: canonical job keys only, newest round
first); nothing ever connects to the site. It reads no job: authenticating one is the job DAG's ``verify``.

It fires ONE event per new job key (``{"job_key": ..., "label": ...}``), each key once: the keys it announced
are kept in the asset state store (DB-backed, so a triggerer restart does not announce them again), and the
keys the site finished with (answered, refused, rejected) come from the site's state file
(:class:`~lepton_tasks.site.state.SiteState`) and are never announced. A key announced and still not
finished ``retry_after`` seconds later (30 min), and not waiting for the site's approver, is announced
again (its DAG run failed for a transient reason that outlived its retries, or a job was not yet valid by
the site's clock), the wait doubling after each retry; a key that left the bucket is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)
STATE_KEY = "announced_jobs"
#: an announced job still unfinished after this long (and not waiting for approval) is announced again
RETRY_AFTER_S = 1800.0
MAX_DOUBLINGS = 4


def poll(
    found: list[str],
    *,
    handled: Collection[str],
    waiting: Collection[str],
    announced: Mapping[str, Any],
    now: float,
    retry_after: float = RETRY_AFTER_S,
) -> tuple[list[str], dict[str, Any]]:
    """One poll: ``(keys to announce, the new memory)``.

    ``found``: the job keys listed now (:func:`~lepton_tasks.site.jobs.poll_jobs` order); ``handled`` and
    ``waiting``: the site state's finished keys and keys waiting for a human; ``announced``: the memory
    (key → ``{"at": when announced, "tries": re-announcements}``). Keys no longer listed, or finished, are
    forgotten.
    """
    announce: list[str] = []
    memory: dict[str, Any] = {}
    for key in found:
        if key in handled:
            continue
        entry = announced.get(key)
        if entry is None:
            announce.append(key)
            memory[key] = {"at": now, "tries": 0}
            continue
        entry = dict(entry)
        wait = retry_after * 2 ** min(int(entry.get("tries", 0)), MAX_DOUBLINGS)
        if key not in waiting and now - float(entry.get("at", now)) >= wait:
            log.warning(
                "job %s was announced %.0f s ago and is still not handled: again", key, now - entry["at"]
            )
            announce.append(key)
            entry = {"at": now, "tries": int(entry.get("tries", 0)) + 1}
        memory[key] = entry
    return announce, memory


def scan() -> tuple[list[str], set[str], set[str]]:
    """``(job keys in the site's exchange bucket, keys the site finished, keys waiting for approval)``."""
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.federation.enrollment import read_bundle
    from lepton_tasks.site.enrollment import SiteFiles, exchange_storage
    from lepton_tasks.site.jobs import poll_jobs
    from lepton_tasks.site.state import SiteState

    files = SiteFiles(LeptonHook.from_env().site_dir)
    if not files.bundle.exists():  # not a site (yet): nothing to watch until `lepton site import`
        log.debug("no enrollment bundle at %s: no exchange to watch", files.bundle)
        return [], set(), set()
    bundle = read_bundle(files.bundle)
    doc = SiteState(files.state).read()
    keys = poll_jobs(exchange_storage(bundle), bundle.bucket, last_seen=doc.handled)
    return keys, set(doc.handled), set(doc.waiting)


class ExchangeTrigger(BaseEventTrigger):
    """Lists the site's exchange bucket every ``poll_interval`` seconds; one event per new job key."""

    def __init__(self, poll_interval: float = 10.0, retry_after: float = RETRY_AFTER_S) -> None:
        super().__init__()
        self.poll_interval = poll_interval
        self.retry_after = retry_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "lepton_airflow.exchange_trigger.ExchangeTrigger",
            {"poll_interval": self.poll_interval, "retry_after": self.retry_after},
        )

    def _poll(self, announced: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        found, handled, waiting = scan()
        return poll(
            found,
            handled=handled,
            waiting=waiting,
            announced=announced,
            now=time.time(),
            retry_after=self.retry_after,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from lepton_tasks.site.training import job_label

        store = self.asset_state_store
        announced: dict[str, Any] = {}
        if store is not None:
            saved = await store.aget(STATE_KEY, {})
            announced = dict(saved) if isinstance(saved, dict) else {}
        while True:
            try:
                keys, memory = await asyncio.to_thread(self._poll, announced)
            except Exception as exc:  # noqa: BLE001 - an outage or a missing enrollment must not kill it; logged
                log.warning("exchange poll failed, retrying in %ss: %s", self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            if memory != announced:
                announced = memory
                if store is not None:
                    await store.aset(STATE_KEY, announced)
            for key in keys:
                log.info("announcing job %s", key)
                yield TriggerEvent({"job_key": key, "label": job_label(key)})
            await asyncio.sleep(self.poll_interval)
