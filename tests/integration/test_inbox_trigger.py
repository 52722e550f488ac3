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
def trigger_env(settings, monkeypatch):
    from lepton_tasks.ops.embedded.airflow import airflow_connections

    for k, v in airflow_connections(settings).items():
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
