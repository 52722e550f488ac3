"""A site's signed announcement of new staged data: round trip, and every way it must be refused."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from lepton_tasks.core.announcements import (
    AnnouncementHeader,
    announcement_key,
    make_announcement,
    open_announcement,
    parse_announcement_key,
)
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.exchange import (
    Expectation,
    MessageKind,
    MessageRejected,
    RejectReason,
    canonical_json,
    make_header,
    open_message,
    seal,
)
from lepton_tasks.core.messages import StagedAnnouncement
from tests.unit.site.fakes import LocalSigner

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CONSORTIUM, SITE, BUCKET = "credit-risk", "bank-a", "exchange-bank-a"


def _announce(signer: LocalSigner, **kw) -> tuple[str, bytes, AnnouncementHeader]:
    contract = load_contract("banks")
    fields = {
        "consortium": CONSORTIUM,
        "site": SITE,
        "bucket": BUCKET,
        "dataset": "banks",
        "contract_version": contract.version_tag,
        "contract_sha256": contract.sha256,
        "signer": signer,
        "now": NOW,
    }
    fields.update(kw)
    return make_announcement(**fields)


def _open(raw: bytes, key: str, signer: LocalSigner, **kw):
    fields = {
        "consortium": CONSORTIUM,
        "site": SITE,
        "bucket": BUCKET,
        "object_key": key,
        "public_key": signer.public_key(),
        "now": NOW + timedelta(minutes=1),
    }
    fields.update(kw)
    return open_announcement(raw, **fields)


def _reason(fn) -> RejectReason:
    with pytest.raises(MessageRejected) as exc:
        fn()
    return exc.value.reason_code


def _edit(raw: bytes, fn) -> bytes:
    doc = json.loads(raw)
    fn(doc)
    return canonical_json(doc)


@pytest.fixture
def signer() -> LocalSigner:
    return LocalSigner("site:bank-a")


def test_round_trip_binds_dataset_site_and_contract(signer):
    key, raw, header = _announce(signer)
    assert key == f"announcements/banks/{header.message_id}.json"
    assert parse_announcement_key(key) == ("banks", header.message_id)
    got, body = _open(raw, key, signer)
    assert got == header
    assert (got.kind, got.consortium, got.site, got.bucket, got.dataset) == (
        MessageKind.ANNOUNCEMENT,
        CONSORTIUM,
        SITE,
        BUCKET,
        "banks",
    )
    contract = load_contract("banks")
    assert body == StagedAnnouncement(
        dataset="banks",
        contract_version=contract.version_tag,
        contract_sha256=contract.sha256,
        announced_at=NOW,
    )


def test_the_payload_reveals_dataset_contract_and_time_only():
    assert set(StagedAnnouncement.model_fields) == {
        "schema_version",
        "dataset",
        "contract_version",
        "contract_sha256",
        "announced_at",
    }
    with pytest.raises(ValueError, match="rows"):
        StagedAnnouncement.model_validate(
            {
                "dataset": "banks",
                "contract_version": "banks@v1",
                "contract_sha256": "0" * 64,
                "announced_at": NOW.isoformat(),
                "rows": 10,
            }
        )
    with pytest.raises(ValueError, match="not a contract of"):
        StagedAnnouncement(
            dataset="banks", contract_version="hospitals@v1", contract_sha256="0" * 64, announced_at=NOW
        )


def test_forged_by_another_key_is_rejected(signer):
    key, raw, _ = _announce(LocalSigner("site:bank-b"))
    assert _reason(lambda: _open(raw, key, signer)) is RejectReason.BAD_SIGNATURE


def test_an_altered_header_is_rejected(signer):
    key, raw, _ = _announce(signer)

    def to_hospitals(doc):
        doc["header"]["dataset"] = "hospitals"

    assert _reason(lambda: _open(_edit(raw, to_hospitals), key, signer)) is RejectReason.BAD_SIGNATURE


def test_a_tampered_payload_is_rejected(signer):
    key, raw, _ = _announce(signer)
    body = json.loads(base64.b64decode(json.loads(raw)["payload"]))
    body["announced_at"] = "2026-12-02T00:00:00Z"

    def swap(doc):
        doc["payload"] = base64.b64encode(canonical_json(body)).decode()

    assert _reason(lambda: _open(_edit(raw, swap), key, signer)) is RejectReason.TAMPERED_PAYLOAD


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("consortium", "other-consortium"),
        ("site", "bank-b"),
        ("bucket", "exchange-bank-b"),
        ("object_key", f"announcements/hospitals/{uuid.uuid4()}.json"),
    ],
)
def test_a_moved_announcement_is_rejected(signer, where, value):
    key, raw, _ = _announce(signer)
    at = value if where == "object_key" else key
    kw = {} if where == "object_key" else {where: value}
    assert _reason(lambda: _open(raw, at, signer, **kw)) is RejectReason.MOVED


def test_a_copy_under_another_key_of_the_same_dataset_is_moved(signer):
    _, raw, _ = _announce(signer)
    other = announcement_key("banks", uuid.uuid4())
    assert _reason(lambda: _open(raw, other, signer)) is RejectReason.MOVED


def test_replayed_expired_and_future_announcements_are_rejected(signer):
    key, raw, header = _announce(signer)
    assert _reason(lambda: _open(raw, key, signer, seen_ids={header.message_id})) is RejectReason.REPLAY
    assert _reason(lambda: _open(raw, key, signer, now=NOW + timedelta(days=8))) is RejectReason.EXPIRED
    assert (
        _reason(lambda: _open(raw, key, signer, now=NOW - timedelta(hours=1))) is RejectReason.NOT_YET_VALID
    )


def test_an_announcement_is_never_an_answer_nor_the_reverse(signer):
    """``kind`` is signed: the site's signed answer cannot be passed off as an announcement, nor back."""
    key, raw, _ = _announce(signer)
    expected = Expectation.for_job(consortium=CONSORTIUM, site=SITE, bucket=BUCKET, object_key=key)
    with pytest.raises(MessageRejected) as exc:
        open_message(raw, expected=expected, public_key=signer.public_key(), seen_ids=(), now=NOW)
    assert exc.value.reason_code is RejectReason.MALFORMED

    job = make_header(
        MessageKind.JOB,
        consortium=CONSORTIUM,
        run_id="run-1",
        round=1,
        site=SITE,
        bucket=BUCKET,
        payload=b"{}",
        payload_schema="lepton-round-job/1",
        ttl=timedelta(hours=1),
        now=NOW,
    )
    sealed = seal(job, b"{}", signer)
    assert _reason(lambda: _open(sealed, key, signer)) is RejectReason.WRONG_KIND


def test_an_announcement_has_its_own_header_not_make_headers():
    with pytest.raises(ValueError, match="own header"):
        make_header(
            MessageKind.ANNOUNCEMENT,
            consortium=CONSORTIUM,
            run_id="r",
            round=0,
            site=SITE,
            bucket=BUCKET,
            payload=b"",
            payload_schema="lepton-staged-announcement/1",
            ttl=timedelta(hours=1),
        )


@pytest.mark.parametrize(
    "key",
    ["announcements/banks/x.json", "answers/banks/0001/x.json", f"announcements/Banks/{uuid.uuid4()}.json"],
)
def test_non_announcement_keys_are_refused(key):
    with pytest.raises(ValueError, match="not an announcement key"):
        parse_announcement_key(key)
