"""The coordinator's announcements watcher: one event per announced dataset, carrying its sites."""

from __future__ import annotations

import asyncio

import lepton_airflow.announcements_trigger as mod
from lepton_airflow.announcements_trigger import AnnouncementsTrigger


def _events(trigger: AnnouncementsTrigger, n: int) -> list[dict]:
    async def take() -> list[dict]:
        gen = trigger.run()
        out = [(await anext(gen)).payload for _ in range(n)]
        await gen.aclose()
        return out

    return asyncio.run(asyncio.wait_for(take(), timeout=10))


def test_fires_one_event_per_dataset_with_its_sites_and_survives_a_failed_poll(monkeypatch):
    polls = iter(
        [
            RuntimeError("storage down"),
            {},
            {"banks": ["bank-a", "bank-b"], "hospitals": ["bank-c"]},
        ]
    )

    def fake_poll() -> dict[str, list[str]]:
        step = next(polls)
        if isinstance(step, Exception):
            raise step
        return step

    monkeypatch.setattr(mod, "poll_once", fake_poll)
    events = _events(AnnouncementsTrigger(poll_interval=0.01), 2)
    assert events == [
        {"dataset": "banks", "sites": ["bank-a", "bank-b"]},
        {"dataset": "hospitals", "sites": ["bank-c"]},
    ]


def test_serializes_to_its_import_path():
    path, kwargs = AnnouncementsTrigger(poll_interval=7.0).serialize()
    assert path == "lepton_airflow.announcements_trigger.AnnouncementsTrigger"
    assert AnnouncementsTrigger(**kwargs).poll_interval == 7.0
