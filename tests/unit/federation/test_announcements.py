"""The coordinator's reader of the sites' announcements: verified, reported once, forged ones rejected."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lepton_tasks.adapters.storage import StorageError
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.exchange import canonical_json
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.federation.announcements import SEEN_KEY, announced_dataset, poll_announcements
from lepton_tasks.federation.enrollment import SiteEntry, SiteRegistry, pin_site_key
from lepton_tasks.site.announce import write_announcement
from tests.unit.site.fakes import LocalSigner, MemoryStorage

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CONSORTIUM = "credit-risk"
SITES = ("bank-a", "bank-b", "bank-c")
MODELS = "models"


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.storage = MemoryStorage()
        self.storage.ensure_bucket(MODELS)
        self.registry = SiteRegistry(tmp_path / "sites.yaml")
        self.signers = {}
        for site in SITES:
            self.signers[site] = LocalSigner(f"site:{site}")
            self.storage.ensure_bucket(f"exchange-{site}")
            self.registry.put(
                SiteEntry(
                    site=site,
                    consortium=CONSORTIUM,
                    bucket=f"exchange-{site}",
                    s3_user=f"exchange-{site}",
                    enrolled_at=NOW,
                )
            )
            if site != "bank-c":  # bank-c is enrolled but its key is not pinned yet
                s = self.signers[site]
                pin_site_key(self.registry, site, s.public_key_b64, s.fingerprint, now=NOW)

    def announce(self, site: str, dataset: str = "banks", signer: LocalSigner | None = None) -> str:
        return write_announcement(
            self.storage,
            f"exchange-{site}",
            consortium=CONSORTIUM,
            site=site,
            dataset=dataset,
            signer=signer or self.signers[site],
            outbound_log=OutboundLog(self.tmp / f"{site}.jsonl"),
            now=NOW,
        ).key

    def poll(self, **kw):
        kw.setdefault("now", NOW + timedelta(minutes=1))
        return poll_announcements(self.storage, MODELS, self.registry, consortium=CONSORTIUM, **kw)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_new_announcement_is_reported_once(world):
    key = world.announce("bank-a")
    world.announce("bank-b")
    world.announce("bank-b", "hospitals")
    first = world.poll()
    assert first.by_dataset() == {"banks": ["bank-a", "bank-b"], "hospitals": ["bank-b"]}
    assert not first.rejected
    a = next(x for x in first.accepted if x.site == "bank-a")
    assert (a.key, a.contract_version, a.announced_at) == (key, load_contract("banks").version_tag, NOW)
    # seen: never again, also by a fresh reader (the memory is in the coordinator's storage)
    assert world.poll().by_dataset() == {}
    assert json.loads(world.storage.buckets[MODELS][SEEN_KEY])["sites"]["bank-a"] == [key]
    world.announce("bank-a")
    assert world.poll().by_dataset() == {"banks": ["bank-a"]}


def test_a_forged_announcement_is_rejected_logged_and_starts_nothing(world, caplog):
    forged = world.announce("bank-a", signer=LocalSigner("mallory"))  # bank-a's bucket, another key
    with caplog.at_level("WARNING"):
        result = world.poll()
    assert result.accepted == [] and result.by_dataset() == {}
    [rej] = result.rejected
    assert (rej.site, rej.key, rej.reason["reason_code"]) == ("bank-a", forged, "bad_signature")
    assert "REJECTED announcement" in caplog.text
    assert world.poll().rejected == []  # logged once, not at every poll


def test_an_announcement_copied_into_another_sites_bucket_is_moved(world):
    key = world.announce("bank-a")
    raw = world.storage.buckets["exchange-bank-a"].pop(key)
    world.storage.buckets["exchange-bank-b"][key] = raw  # bank-b's key does not sign bank-a's header
    result = world.poll()
    assert result.accepted == []
    assert [r.reason["reason_code"] for r in result.rejected] == ["bad_signature"]


def test_a_tampered_announcement_is_rejected(world):
    key = world.announce("bank-a")
    doc = json.loads(world.storage.buckets["exchange-bank-a"][key])
    doc["payload"] = doc["payload"][:-4] + "AAA="
    world.storage.buckets["exchange-bank-a"][key] = canonical_json(doc)
    result = world.poll()
    assert result.accepted == [] and result.rejected[0].reason["reason_code"] == "tampered_payload"


def test_unpinned_sites_and_junk_keys(world):
    world.announce("bank-c")  # not pinned: not read at all
    world.storage.put_bytes("exchange-bank-a", "announcements/banks/not-an-id.json", b"{}")
    result = world.poll()
    assert result.accepted == []
    assert [(r.site, r.reason["reason_code"]) for r in result.rejected] == [("bank-a", "malformed")]
    assert ("list", "exchange-bank-c", "announcements/") not in world.storage.calls


def test_an_unreadable_site_is_read_again_next_poll(world, monkeypatch):
    world.announce("bank-a")
    real = world.storage.list

    def down(bucket, prefix="", **kw):
        if bucket == "exchange-bank-a":
            raise StorageError("cannot list: ServiceUnavailable")
        return real(bucket, prefix, **kw)

    monkeypatch.setattr(world.storage, "list", down)
    assert world.poll().by_dataset() == {}
    monkeypatch.setattr(world.storage, "list", real)
    assert world.poll().by_dataset() == {"banks": ["bank-a"]}


def test_announced_dataset_takes_the_latest_known_one():
    extras = [
        {"from_trigger": True, "payload": {"dataset": "banks", "sites": ["bank-a"]}},
        {"from_trigger": True, "payload": {"dataset": "nope", "sites": ["bank-a"]}},
        {"from_trigger": True, "payload": {"dataset": "hospitals", "sites": ["bank-b"]}},
        None,
    ]
    assert announced_dataset(extras, ["banks", "hospitals"]) == "hospitals"
    assert announced_dataset([], ["banks"]) is None
    assert announced_dataset([{"payload": {"dataset": "nope"}}], ["banks"]) is None
