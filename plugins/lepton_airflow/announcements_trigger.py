"""The coordinator's announcements watcher: a polling event trigger over the sites' exchange buckets.

Every ``poll_interval`` seconds it calls :func:`lepton_tasks.federation.announcements.poll_announcements`
(blocking S3 calls in a thread) with the coordinator's settings from the environment (``LeptonHook.from_env``,
like the other triggers): every pinned site's ``announcements/`` is listed, each new object verified with the
site's pinned key; a forged, moved or tampered one is logged there and starts nothing. It fires ONE event per
announced dataset, ``{"dataset": ..., "sites": [...]}`` (the ``lepton-announcements`` Asset's event extra
carries it under ``payload``), which starts ``lepton_federated`` for that dataset. What was read is
remembered in the coordinator's storage, so a restart announces nothing twice. A failed poll (storage down, a
damaged registry) is logged and polled again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)


def poll_once() -> dict[str, list[str]]:
    """One poll: ``{dataset: announcing sites}`` of the new verified announcements (blocking)."""
    from lepton_airflow.hook import LeptonHook
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.federation.announcements import poll_announcements
    from lepton_tasks.federation.enrollment import SiteRegistry

    settings = LeptonHook.from_env()
    result = poll_announcements(
        Storage.from_settings(settings),
        settings.models_bucket,
        SiteRegistry(settings.site_registry_file),
        consortium=settings.consortium,
    )
    return result.by_dataset()


class AnnouncementsTrigger(BaseEventTrigger):
    """Polls the sites' announcements every ``poll_interval`` seconds; one event per announced dataset."""

    def __init__(self, poll_interval: float = 30.0) -> None:
        super().__init__()
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "lepton_airflow.announcements_trigger.AnnouncementsTrigger",
            {"poll_interval": self.poll_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                announced = await asyncio.to_thread(poll_once)
            except Exception as exc:  # noqa: BLE001 - an outage or a damaged registry must not kill it; logged
                log.warning("announcements poll failed, retrying in %ss: %s", self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            for dataset, sites in announced.items():
                log.info("sites %s announced new staged data for %s", ", ".join(sites), dataset)
                yield TriggerEvent({"dataset": dataset, "sites": sites})
            await asyncio.sleep(self.poll_interval)
