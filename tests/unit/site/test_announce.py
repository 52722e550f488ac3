"""The site's announcement writer: one signed object in its exchange bucket, logged first; none unenrolled."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lepton_tasks.core.announcements import open_announcement
from lepton_tasks.core.exchange import MessageKind, sha256_hex
from lepton_tasks.core.outbound_log import ListedObject, OutboundLog, read_log, reconcile
from lepton_tasks.site.announce import announce_staged, write_announcement
from tests.unit.site.fakes import LocalSigner, MemoryStorage

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
BUCKET = "exchange-bank-a"


def test_writes_exactly_one_signed_announcement_and_logs_it_first(tmp_path):
    storage, signer = MemoryStorage(), LocalSigner("site:bank-a")
    storage.ensure_bucket(BUCKET)
    log = OutboundLog(tmp_path / "outbound.jsonl")
    sent = write_announcement(
        storage,
        BUCKET,
        consortium="credit-risk",
        site="bank-a",
        dataset="banks",
        signer=signer,
        outbound_log=log,
        now=NOW,
    )
    assert storage.puts() == [sent.key] and sent.key.startswith("announcements/banks/")
    assert signer.signed == 1
    raw = storage.buckets[BUCKET][sent.key]
    header, body = open_announcement(
        raw,
        consortium="credit-risk",
        site="bank-a",
        bucket=BUCKET,
        object_key=sent.key,
        public_key=signer.public_key(),
        now=NOW,
    )
    assert header == sent.header and body.dataset == "banks"
    [record] = read_log(log.path)
    assert (record.kind, record.bucket, record.object_key, record.message_id) == (
        MessageKind.ANNOUNCEMENT,
        BUCKET,
        sent.key,
        header.message_id,
    )
    # what the site wrote is exactly what its log lists (announcements/ is a site-written prefix)
    listing = [ListedObject(k, len(v), sha256_hex(v)) for k, v in storage.buckets[BUCKET].items()]
    diff = reconcile([record], listing)
    assert not (diff.unlogged or diff.missing or diff.mismatched)


def test_a_failed_put_surfaces_with_the_record_already_logged(tmp_path):
    """Write-ahead: the put fails (the task retries), the log lists what may have left."""
    from lepton_tasks.adapters.storage import StorageError

    log = OutboundLog(tmp_path / "outbound.jsonl")
    with pytest.raises(StorageError):  # the bucket does not exist
        write_announcement(
            MemoryStorage(),
            BUCKET,
            consortium="credit-risk",
            site="bank-a",
            dataset="banks",
            signer=LocalSigner(),
            outbound_log=log,
            now=NOW,
        )
    assert len(read_log(log.path)) == 1


def test_a_site_without_a_bundle_skips_without_touching_vault(tmp_path, monkeypatch, caplog):
    from lepton_tasks.adapters.settings import load_settings

    monkeypatch.setenv("LEPTON_DATA_DIR", str(tmp_path))
    settings = load_settings()

    def no_vault():
        raise AssertionError("Vault must not be contacted by a site that is not enrolled")

    with caplog.at_level("INFO"):
        assert announce_staged(settings, no_vault, "banks") is None
    assert "no enrollment bundle" in caplog.text


def test_an_announcement_the_log_does_not_list_is_flagged_unlogged():
    """``announcements/`` is a site-written prefix: an object written as the site without a record is the
    reconciliation's alarm."""
    key = "announcements/banks/5215baf5-258f-43c8-b875-cdd92536261e.json"
    diff = reconcile([], [ListedObject(key, 10, "0" * 64)])
    assert diff.unlogged == (key,)
