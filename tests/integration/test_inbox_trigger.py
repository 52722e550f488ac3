"""The inbox event trigger against real SeaweedFS: one event per poll with every new drop, nothing announced
twice, and no drop missed across a triggerer restart (state kept in the asset state store)."""

from __future__ import annotations

import asyncio

import pytest

from lepton_tasks.ops.partners import drop_as_partner

pytestmark = pytest.mark.integration


class MemoryStateStore:
    """Stands in for the DB-backed asset state store (same aget/aset contract); survives 'restarts'."""

    def __init__(self) -> None:
        self.data: dict = {}

    async def aget(self, key, default=None):
        return self.data.get(key, default)

    async def aset(self, key, value) -> None:
        self.data[key] = value


async def _next_event(trigger, timeout: float):
    gen = trigger.run()
    try:
        return await asyncio.wait_for(gen.__anext__(), timeout)
    except TimeoutError:
        return None
    finally:
        await gen.aclose()


@pytest.fixture
def trigger_env(services, monkeypatch):
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    for k, v in airflow_connections(services.airflow_settings()).items():
        monkeypatch.setenv(k, v)
    yield


def test_new_drops_are_announced_once_and_survive_a_restart(trigger_env, settings, onboard, admin_storage):
    from lepton_airflow.inbox_trigger import InboxTrigger

    onboard("trig-a")
    onboard("trig-b")
    admin_storage.put_bytes("inbox-trig-a", "quarantine/banks/0123/reason.json", b"{}")  # never a drop
    store = MemoryStateStore()
    drop_as_partner(settings, "trig-a", "banks/one.csv", b"a,b\n1,2\n")
    drop_as_partner(settings, "trig-b", "banks/two.csv", b"a,b\n1,2\n")

    t1 = InboxTrigger(poll_interval=0.2)
    t1.asset_state_store = store
    event = asyncio.run(_next_event(t1, 30))
    assert event is not None
    keys = {(d["partner"], d["key"]) for d in event.payload["drops"]}
    assert {("trig-a", "banks/one.csv"), ("trig-b", "banks/two.csv")} <= keys  # one event, both drops
    assert not any(k.startswith("quarantine/") for _, k in keys)

    # "restart": a new trigger with the persisted state announces nothing already announced...
    t2 = InboxTrigger(poll_interval=0.2)
    t2.asset_state_store = store
    assert asyncio.run(_next_event(t2, 2)) is None
    # ...and a drop made while it was down is announced after the restart, alone
    drop_as_partner(settings, "trig-a", "banks/three.csv", b"a,b\n3,4\n")
    t3 = InboxTrigger(poll_interval=0.2)
    t3.asset_state_store = store
    event = asyncio.run(_next_event(t3, 30))
    assert event is not None
    assert [(d["partner"], d["key"]) for d in event.payload["drops"]] == [("trig-a", "banks/three.csv")]


def test_a_drop_is_new_until_announced_with_the_same_etag():
    from lepton_airflow.inbox_trigger import new_drops

    found = {"p/banks/x.csv": {"partner": "p", "key": "banks/x.csv", "etag": "1"}}
    assert new_drops(found, {}) == [found["p/banks/x.csv"]]
    assert new_drops(found, {"p/banks/x.csv": "1"}) == []
    assert new_drops(found, {"p/banks/x.csv": "0"}) == [found["p/banks/x.csv"]]  # re-uploaded content


async def _events_for(trigger, seconds: float) -> list:
    """Every event the trigger yields within ``seconds``."""
    events = []
    gen = trigger.run()

    async def collect():
        async for event in gen:
            events.append(event)

    try:
        await asyncio.wait_for(collect(), seconds)
    except TimeoutError:
        pass
    finally:
        await gen.aclose()
    return events


def test_an_announced_drop_that_was_not_ingested_is_announced_again_until_handled(
    trigger_env, settings, onboard, admin_storage
):
    """The ingest of an announced drop failed (storage down…): it was stranded until the daily sweep; now the
    trigger announces it again once ``retry_after`` has passed, and stops once ingest recorded it."""
    from lepton_airflow.inbox_trigger import InboxTrigger
    from lepton_tasks.ingest.stage import mark_announced

    onboard("trig-r")
    drop_as_partner(settings, "trig-r", "banks/retry.csv", b"a,b\n5,6\n")
    mine = ("trig-r", "banks/retry.csv")
    store = MemoryStateStore()
    t = InboxTrigger(poll_interval=0.2, retry_after=0.5)
    t.asset_state_store = store
    events = asyncio.run(_events_for(t, 4))
    announced = [e for e in events if mine in {(d["partner"], d["key"]) for d in e.payload["drops"]}]
    assert len(announced) >= 2  # announced, then again (nothing ingested it): was announced once, ever

    etag = admin_storage.stat("inbox-trig-r", "banks/retry.csv").etag
    mark_announced(
        admin_storage,
        settings,
        [
            {
                "status": "staged",
                "partner": "trig-r",
                "object_key": "banks/retry.csv",
                "etag": etag,
                "drop_id": "x",
            }
        ],
    )
    # the next check is due now, whatever backoff the polls above reached (their number depends on load)
    store.data["announced"]["trig-r/banks/retry.csv"]["at"] = 0.0
    t2 = InboxTrigger(poll_interval=0.2, retry_after=0.5)
    t2.asset_state_store = store
    events = asyncio.run(_events_for(t2, 3))
    assert not [e for e in events if mine in {(d["partner"], d["key"]) for d in e.payload["drops"]}]
    assert store.data["announced"]["trig-r/banks/retry.csv"]["handled"] is True
