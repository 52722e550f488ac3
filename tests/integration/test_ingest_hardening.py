"""Ingest hardening against real SeaweedFS + OpenBao: quarantine keeps every key of identical bad bytes, a
partner feeds only its datasets, a contract change re-validates (re-sent files and ``restage``), and a drop
is never stranded: a retry after a crash or a transient failure stages and announces it."""

from __future__ import annotations

import time

import pytest

from lepton_tasks.adapters.manifest import read_manifest
from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.drops import DropError
from lepton_tasks.ingest.stage import (
    already_ingested,
    drop_state,
    ingest_batch,
    ingest_drop,
    mark_announced,
    restage,
    staged_manifests,
)
from lepton_tasks.ops.partners import Registry, drop_as_partner

pytestmark = pytest.mark.integration

HEADER = "customer_id,student,balance,income,default"


def banks_csv(n: int = 60, *, start: int = 0, balance: float = 100.0) -> bytes:
    rows = [
        f"c{i:05d},{'Yes' if i % 3 == 0 else 'No'},{balance + i:.2f},{20000 + 37 * i},"
        f"{'Yes' if i % 7 == 0 else 'No'}"
        for i in range(start, start + n)
    ]
    return ("\n".join([HEADER, *rows]) + "\n").encode()


BAD = b"customer_id,student,balance,income,default\nc1,No,12.5,abc,No\n"


# --------------------------------------------------------------------------------------- quarantine (2)


def test_identical_bad_bytes_under_two_keys_keep_every_key(settings, admin_storage, operator_vault, onboard):
    name = "hard-q"
    onboard(name, ["banks"])
    inbox = settings.inbox_bucket(name)
    for key in ("banks/first.csv", "banks/second.csv"):
        drop_as_partner(settings, name, key, BAD)
        with pytest.raises(DropError):
            ingest_drop(settings, admin_storage, operator_vault, name, key)
    reasons = [o.key for o in admin_storage.list(inbox, "quarantine/") if o.key.endswith("reason.json")]
    assert len(reasons) == 1  # keyed by content: one folder
    reason = admin_storage.get_json(inbox, reasons[0])
    assert reason["object_keys"] == ["banks/first.csv", "banks/second.csv"]  # was ["banks/second.csv"]
    assert reason["object_key"] == "banks/second.csv"
    originals = [o.key for o in admin_storage.list(inbox, "quarantine/") if o.key.endswith(".original")]
    assert len(originals) == 2 and all(admin_storage.get_bytes(inbox, k) == BAD for k in originals)
    index = admin_storage.get_json(settings.quarantine_bucket, f"{name}/{reason['drop_id']}.json")
    assert index["object_keys"] == ["banks/first.csv", "banks/second.csv"]


# ------------------------------------------------------------------------------------ registry datasets (6)


def test_a_partner_cannot_feed_a_dataset_it_is_not_onboarded_for(
    settings, admin_storage, operator_vault, onboard
):
    name = "hard-ds"
    onboard(name, ["banks"])
    drop_as_partner(settings, name, "hospitals/sneaky.csv", banks_csv())
    allowed = Registry(settings.registry_file).allowed_datasets()
    assert allowed[name] == ["banks"]
    [res] = ingest_batch(
        settings,
        admin_storage,
        operator_vault,
        [{"partner": name, "key": "hospitals/sneaky.csv"}],
        allowed=allowed,
    )
    assert res.status == "quarantined" and res.reason["code"] == "dataset_not_allowed"
    assert f"partner {name} is onboarded for datasets [banks]; this drop is for hospitals" in res.error
    assert not staged_manifests(admin_storage, settings, "hospitals", [name])
    inbox = settings.inbox_bucket(name)
    assert not admin_storage.exists(inbox, "hospitals/sneaky.csv")
    assert any(o.key.endswith("reason.json") for o in admin_storage.list(inbox, "quarantine/hospitals/"))
    # its own dataset still goes through
    drop_as_partner(settings, name, "banks/fine.csv", banks_csv())
    [ok] = ingest_batch(
        settings, admin_storage, operator_vault, [{"partner": name, "key": "banks/fine.csv"}], allowed=allowed
    )
    assert ok.status == "staged"


def test_a_partner_missing_from_the_registry_feeds_nothing(settings, admin_storage, operator_vault, onboard):
    name = "hard-gone"
    onboard(name, ["banks"])
    drop_as_partner(settings, name, "banks/x.csv", banks_csv())
    [res] = ingest_batch(
        settings, admin_storage, operator_vault, [{"partner": name, "key": "banks/x.csv"}], allowed={}
    )
    assert res.status == "quarantined" and "not onboarded for any dataset" in res.error


# --------------------------------------------------------------------------------- contract version (7)


def bumped_banks() -> Contract:
    """banks@v2: balances above 2,000 are now out of range."""
    doc = load_contract("banks").document()
    doc["version"] = 2
    doc["columns"]["balance"]["max"] = 2000
    return Contract.model_validate(doc)


def test_a_contract_bump_revalidates_resent_files_and_restage(
    settings, admin_storage, operator_vault, onboard, monkeypatch
):
    import lepton_tasks.ingest.stage as stage

    name = "hard-v"
    onboard(name, ["banks"])
    files = {
        "banks/resent.csv": banks_csv(start=0),
        "banks/fine.csv": banks_csv(start=100),
        "banks/high.csv": banks_csv(start=200, balance=3000.0),  # fine under v1, out of range under v2
        "banks/deleted.csv": banks_csv(start=300),
    }
    v1 = {}
    for key, data in files.items():
        drop_as_partner(settings, name, key, data)
        v1[key] = ingest_drop(settings, admin_storage, operator_vault, name, key)
        assert v1[key].status == "staged"
    old_objects = {
        key: read_manifest(admin_storage, settings, operator_vault, name, r.manifest_key).objects
        for key, r in v1.items()
    }
    admin_storage.remove(settings.inbox_bucket(name), "banks/deleted.csv")

    v2 = bumped_banks()
    assert v2.sha256 != load_contract("banks").sha256
    monkeypatch.setattr(stage, "load_contract", lambda ds: v2 if ds == "banks" else load_contract(ds))

    # the partner re-sends a file: validated again under v2 (it was "already staged")
    drop_as_partner(settings, name, "banks/resent-again.csv", files["banks/resent.csv"])
    again = ingest_drop(settings, admin_storage, operator_vault, name, "banks/resent-again.csv")
    assert again.status == "staged" and again.drop_id == v1["banks/resent.csv"].drop_id
    m = read_manifest(admin_storage, settings, operator_vault, name, again.manifest_key)
    assert m.contract == "banks@v2" and m.contract_sha256 == v2.sha256
    # and sent once more under v2: nothing new
    assert ingest_drop(settings, admin_storage, operator_vault, name, "banks/resent.csv").status == "skipped"

    results = {
        r.object_key: r for r in restage(settings, admin_storage, operator_vault, "banks", partners=[name])
    }
    assert set(results) == {"banks/fine.csv", "banks/high.csv", "banks/deleted.csv"}  # resent is current
    assert results["banks/fine.csv"].status == "staged"
    assert results["banks/high.csv"].status == "quarantined"
    assert results["banks/high.csv"].reason["code"] == "out_of_range"
    assert (
        results["banks/deleted.csv"].status == "gone"
        and "send it again" in results["banks/deleted.csv"].error
    )
    fine = read_manifest(
        admin_storage, settings, operator_vault, name, results["banks/fine.csv"].manifest_key
    )
    assert fine.contract_sha256 == v2.sha256
    for key in ("banks/resent.csv", "banks/fine.csv"):  # the replaced manifest's objects are gone
        for obj in old_objects[key].values():
            assert not admin_storage.exists(settings.staging_bucket, obj.key)
    # again: only what is still under v1 is listed; both originals have left the inbox (quarantine, deleted)
    again = restage(settings, admin_storage, operator_vault, "banks", partners=[name])
    assert sorted((r.object_key, r.status) for r in again) == [
        ("banks/deleted.csv", "gone"),
        ("banks/high.csv", "gone"),
    ]


# ------------------------------------------------------------------------------- never stranded (9)


def test_a_retry_after_a_crash_before_the_announcement_reports_the_drop_staged(
    settings, admin_storage, operator_vault, onboard
):
    name = "hard-crash"
    onboard(name, ["banks"])
    drop_as_partner(settings, name, "banks/c.csv", banks_csv())
    first = ingest_drop(settings, admin_storage, operator_vault, name, "banks/c.csv", mark_seen=False)
    assert first.status == "staged"
    manifest = admin_storage.get_json(settings.staging_bucket, first.manifest_key)
    # the task died before the drop was announced (no _seen): the retry announces it, without redoing it
    retry = ingest_drop(settings, admin_storage, operator_vault, name, "banks/c.csv", mark_seen=False)
    assert (
        retry.status == "staged" and retry.drop_id == first.drop_id and retry.rows == first.rows
    )  # was skipped
    assert admin_storage.get_json(settings.staging_bucket, first.manifest_key) == manifest
    assert already_ingested(admin_storage, settings, name, "banks/c.csv", first.etag) is None
    assert mark_announced(admin_storage, settings, [retry]) == 1
    assert already_ingested(admin_storage, settings, name, "banks/c.csv", first.etag) == first.drop_id
    assert ingest_drop(settings, admin_storage, operator_vault, name, "banks/c.csv").status == "skipped"
    # a copy of the same bytes under another key is nothing new: skipped, and handled at once
    drop_as_partner(settings, name, "banks/c-copy.csv", banks_csv())
    copy = ingest_drop(settings, admin_storage, operator_vault, name, "banks/c-copy.csv", mark_seen=False)
    assert copy.status == "skipped"
    assert already_ingested(admin_storage, settings, name, "banks/c-copy.csv", copy.etag) == first.drop_id


class FlakyStorage:
    """The real storage, except that uploads fail while ``down`` (SeaweedFS unreachable)."""

    def __init__(self, real) -> None:
        self.real, self.down = real, True

    def __getattr__(self, name):
        return getattr(self.real, name)

    def put_file(self, *args, **kwargs):
        if self.down:
            raise ConnectionError("storage is down")
        return self.real.put_file(*args, **kwargs)


def test_a_transient_failure_leaves_the_drop_pending_and_a_retry_stages_it(
    settings, admin_storage, operator_vault, onboard
):
    name = "hard-flaky"
    onboard(name, ["banks"])
    drop_as_partner(settings, name, "banks/f.csv", banks_csv())
    drop_as_partner(settings, name, "banks/g.csv", banks_csv(start=500))
    storage = FlakyStorage(admin_storage)
    batch = [{"partner": name, "key": "banks/f.csv"}, {"partner": name, "key": "banks/g.csv"}]
    results = ingest_batch(settings, storage, operator_vault, batch, mark_seen=False)
    assert [r.status for r in results] == ["failed", "failed"]  # one drop's failure does not stop the next
    assert "ConnectionError: storage is down" in results[0].error
    etag = admin_storage.stat(settings.inbox_bucket(name), "banks/f.csv").etag
    assert admin_storage.exists(settings.inbox_bucket(name), "banks/f.csv")  # still in the inbox
    assert not staged_manifests(admin_storage, settings, "banks", [name])  # nothing committed
    assert drop_state(admin_storage, settings, name, "banks/f.csv", etag) == "pending"  # the trigger retries
    storage.down = False
    results = ingest_batch(settings, storage, operator_vault, batch, mark_seen=False)
    assert [r.status for r in results] == ["staged", "staged"]
    mark_announced(admin_storage, settings, results)
    assert drop_state(admin_storage, settings, name, "banks/f.csv", etag) == "handled"


def test_an_ingest_at_work_holds_a_live_lease(settings, admin_storage, onboard):
    from lepton_tasks.ingest.stage import _Lease

    name = "hard-lease"
    onboard(name, ["banks"])
    drop_as_partner(settings, name, "banks/l.csv", banks_csv())
    etag = admin_storage.stat(settings.inbox_bucket(name), "banks/l.csv").etag
    with _Lease(admin_storage, settings, name, "banks/l.csv", etag, heartbeat_s=0.2):
        assert drop_state(admin_storage, settings, name, "banks/l.csv", etag) == "in_progress"
        time.sleep(0.5)  # renewed by the heartbeat: still live with a short ttl
        assert drop_state(admin_storage, settings, name, "banks/l.csv", etag, lease_ttl=0.4) == "in_progress"
    assert drop_state(admin_storage, settings, name, "banks/l.csv", etag) == "pending"  # ended
    assert drop_state(admin_storage, settings, name, "banks/l.csv", "other-etag") == "pending"
