"""The site's outbound log: append-only, private, strict to read, and it reconciles with the bucket."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from lepton_tasks.core.exchange import MessageKind, sha256_hex
from lepton_tasks.core.outbound_log import (
    ListedObject,
    Mismatch,
    OutboundLog,
    OutboundLogError,
    OutboundRecord,
    read_log,
    reconcile,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
BUCKET = "exchange-bank-a"


def record(
    key: str, data: bytes, *, kind: MessageKind = MessageKind.ANSWER, bucket: str = BUCKET
) -> OutboundRecord:
    return OutboundRecord.for_object(
        kind=kind,
        bucket=bucket,
        object_key=key,
        data=data,
        run_id="run-1",
        round=1,
        message_id=uuid.uuid4(),
        now=NOW,
    )


def listed(key: str, data: bytes, *, with_hash: bool = True) -> ListedObject:
    return ListedObject(key, len(data), sha256_hex(data) if with_hash else None)


# ------------------------------------------------------------------------------------------------ the file


def test_records_append_and_read_back_in_order(tmp_path):
    log = OutboundLog(tmp_path / "site" / "outbound.jsonl")
    assert log.records() == []
    first = record("answers/run-1/0001/a.json", b"update one")
    second = record("refusals/run-1/0002/b.json", b"refusal", kind=MessageKind.REFUSAL)
    log.append(first)
    log.append(second)
    assert log.records() == [first, second]
    assert first.size == 10 and first.sha256 == sha256_hex(b"update one")
    lines = log.path.read_bytes().splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        b'{"bucket":"exchange-bank-a","kind":"answer"'
    )  # canonical


def test_the_log_is_private(tmp_path):
    path = tmp_path / "new-dir" / "outbound.jsonl"
    OutboundLog(path).append(record("answers/k.json", b"x"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_log_others_can_read_is_refused(tmp_path):
    path = tmp_path / "outbound.jsonl"
    OutboundLog(path).append(record("answers/k.json", b"x"))
    os.chmod(path, 0o644)
    with pytest.raises(OutboundLogError, match="mode 644"):
        OutboundLog(path).append(record("answers/l.json", b"y"))


def test_a_symlinked_log_is_refused(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.touch(mode=0o600)
    (tmp_path / "outbound.jsonl").symlink_to(target)
    with pytest.raises(OutboundLogError, match="cannot open"):
        OutboundLog(tmp_path / "outbound.jsonl").append(record("answers/k.json", b"x"))


def test_a_torn_last_line_stops_appends_and_reads(tmp_path):
    path = tmp_path / "outbound.jsonl"
    log = OutboundLog(path)
    log.append(record("answers/k.json", b"x"))
    with open(path, "ab") as f:
        f.write(b'{"kind":"ans')
    with pytest.raises(OutboundLogError, match="incomplete"):
        log.append(record("answers/l.json", b"y"))
    with pytest.raises(OutboundLogError, match="incomplete"):
        read_log(path)


def test_a_line_that_is_not_a_record_is_reported_with_its_number(tmp_path):
    path = tmp_path / "outbound.jsonl"
    log = OutboundLog(path)
    log.append(record("answers/k.json", b"x"))
    with open(path, "ab") as f:
        f.write(b'{"kind":"answer","surprise":1}\n')
    with pytest.raises(OutboundLogError, match=r"outbound.jsonl:2: not an outbound record"):
        read_log(path)


def test_concurrent_appends_do_not_interleave(tmp_path):
    log = OutboundLog(tmp_path / "outbound.jsonl")
    payload = b"z" * 5000

    def writer(n: int) -> None:
        for i in range(25):
            log.append(record(f"answers/run-1/0001/{n}-{i}.json", payload))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.object_key for r in log.records()}) == 100


def test_records_are_strict():
    with pytest.raises(ValueError):
        OutboundRecord.model_validate({**record("answers/k.json", b"x").model_dump(), "sha256": "ABC"})
    with pytest.raises(ValueError):
        OutboundRecord.model_validate({**record("answers/k.json", b"x").model_dump(), "extra": 1})
    later = record("answers/k.json", b"x").model_copy(update={"written_at": NOW + timedelta(hours=1)})
    assert later.written_at.tzinfo is not None


# ------------------------------------------------------------------------------------------------ reconcile


def test_a_log_that_lists_exactly_what_is_in_the_bucket_reconciles():
    written = {"answers/run-1/0001/a.json": b"update", "refusals/run-1/0002/b.json": b"no"}
    log = [record(k, v) for k, v in written.items()]
    bucket = [listed(k, v) for k, v in written.items()]
    bucket.append(listed("jobs/run-1/0001/j.json", b"the coordinator's job"))  # not the site's to log
    diff = reconcile(log, bucket, bucket=BUCKET)
    assert diff.ok, diff
    assert diff.summary() == "the outbound log matches the bucket"


def test_an_object_the_site_did_not_log_is_flagged():
    log = [record("answers/run-1/0001/a.json", b"update")]
    bucket = [listed("answers/run-1/0001/a.json", b"update"), listed("answers/run-1/0001/forged.json", b"?")]
    diff = reconcile(log, bucket)
    assert diff.unlogged == ("answers/run-1/0001/forged.json",)
    assert not diff.ok and diff.summary() == "1 unlogged"


def test_a_logged_object_that_is_gone_is_missing():
    diff = reconcile([record("answers/run-1/0001/a.json", b"update")], [])
    assert diff.missing == ("answers/run-1/0001/a.json",) and not diff.ok


def test_an_object_changed_in_the_bucket_is_mismatched():
    log = [record("answers/a.json", b"update"), record("answers/b.json", b"update")]
    bucket = [listed("answers/a.json", b"upd4te"), listed("answers/b.json", b"longer update")]
    diff = reconcile(log, bucket)
    assert diff.mismatched == (
        Mismatch("answers/a.json", "sha256", sha256_hex(b"update"), sha256_hex(b"upd4te")),
        Mismatch("answers/b.json", "size", "6", "13"),
    )
    # without hashes in the listing only sizes are compared
    assert reconcile(log, [listed("answers/a.json", b"upd4te", with_hash=False), bucket[1]]).mismatched == (
        diff.mismatched[1],
    )


def test_rewriting_a_key_with_other_content_is_reported_but_a_retried_identical_put_is_not():
    same = [record("answers/a.json", b"update"), record("answers/a.json", b"update")]
    assert reconcile(same, [listed("answers/a.json", b"update")]).ok
    changed = [record("answers/a.json", b"update"), record("answers/a.json", b"other")]
    diff = reconcile(changed, [listed("answers/a.json", b"other")])
    assert diff.overwritten == ("answers/a.json",) and not diff.mismatched


def test_records_of_other_buckets_and_prefixes_are_ignored():
    log = [record("answers/a.json", b"x", bucket="exchange-bank-b"), record("notes/n.txt", b"y")]
    assert reconcile(log, [], bucket=BUCKET).ok
    assert reconcile(log, []).missing == ("answers/a.json",)
    assert reconcile(log, [], prefixes=("notes/",)).missing == ("notes/n.txt",)
