"""The exchange envelope: a sealed message opens only where, when and for whom it was meant.

A local Ed25519 key stands in for the Vault signer (the envelope logic does not care who signs: ``Signer``
is a Protocol); tests/integration/test_signing.py does the same against a real OpenBao.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from lepton_tasks.adapters.signing import (
    PublicKey,
    fingerprint,
    format_signature,
    load_public_key,
    normalize_fingerprint,
    parse_signature,
    verify,
)
from lepton_tasks.core.exchange import (
    AnswerHeader,
    Expectation,
    JobHeader,
    JobRef,
    MessageKind,
    MessageRejected,
    RefusalHeader,
    RejectReason,
    SignedMessage,
    canonical_json,
    job_ref,
    make_header,
    object_key,
    open_message,
    parse_header,
    parse_object_key,
    prefix_for,
    reply_header,
    seal,
    sha256_hex,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CONSORTIUM, SITE, BUCKET, RUN = "credit-risk", "bank-a", "exchange-bank-a", "run-20260101"
JOB_PAYLOAD = b'{"weights": "global round 3"}'
ANSWER_PAYLOAD = b'{"update": "bank-a round 3", "n": 1200}'


class LocalSigner:
    """Stands in for TransitSigner: an in-memory Ed25519 key, Vault's signature format."""

    def __init__(self, version: int = 1) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.version = version
        self.public_key_b64 = base64.b64encode(self.key.public_key().public_bytes_raw()).decode()

    def sign(self, data: bytes) -> str:
        return format_signature(self.version, self.key.sign(data))


@pytest.fixture
def coordinator() -> LocalSigner:
    return LocalSigner()


@pytest.fixture
def site() -> LocalSigner:
    return LocalSigner()


def new_job(round_: int = 3, *, payload: bytes = JOB_PAYLOAD, **overrides: Any) -> JobHeader:
    args: dict[str, Any] = {
        "consortium": CONSORTIUM,
        "run_id": RUN,
        "round": round_,
        "site": SITE,
        "bucket": BUCKET,
        "payload": payload,
        "payload_schema": "lepton-job/1",
        "ttl": timedelta(hours=1),
        "now": NOW,
    }
    args.update(overrides)
    header = make_header(MessageKind.JOB, **args)
    assert isinstance(header, JobHeader)
    return header


def job_expectation(header: JobHeader, **overrides: Any) -> Expectation:
    args: dict[str, Any] = {
        "consortium": CONSORTIUM,
        "site": SITE,
        "bucket": BUCKET,
        "object_key": object_key(header),
        "run_id": RUN,
        "round": header.round,
    }
    args.update(overrides)
    return Expectation.for_job(**args)


def open_job(raw: bytes, expected: Expectation, signer: LocalSigner, **kw: Any) -> tuple[Any, bytes]:
    kw.setdefault("seen_ids", set())
    kw.setdefault("now", NOW + timedelta(minutes=1))
    return open_message(raw, expected=expected, public_key=signer.public_key_b64, **kw)


def rejected(fn: Callable[[], object]) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        fn()
    return info.value


def resign(raw: bytes, signer: LocalSigner, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """What a (buggy or newer) legitimate signer would produce: the header changed, then signed properly."""
    doc = json.loads(raw)
    mutate(doc["header"])
    doc["signature"] = signer.sign(canonical_json(doc["header"]))
    return canonical_json(doc)


def edit(raw: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """What an attacker with write access to the bucket can do: change the object, not re-sign it."""
    doc = json.loads(raw)
    mutate(doc)
    return canonical_json(doc)


# ------------------------------------------------------------------------------------------ happy path


def test_a_sealed_job_opens_with_its_header_and_payload(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    got, payload = open_job(raw, job_expectation(header), coordinator)
    assert got == header and payload == JOB_PAYLOAD
    assert object_key(header) == f"jobs/{RUN}/0003/{header.message_id}.json"


def test_the_wire_format_is_canonical_json_and_the_signature_covers_the_canonical_header(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    doc = json.loads(raw)
    assert raw == canonical_json(doc)  # sorted keys, no whitespace
    assert set(doc) == {"schema_version", "header", "signature", "payload"}
    assert base64.b64decode(doc["payload"]) == JOB_PAYLOAD
    signed = canonical_json(header.model_dump(mode="json"))
    assert signed == canonical_json(doc["header"])
    assert verify(coordinator.public_key_b64, signed, doc["signature"])
    assert doc["header"]["payload_sha256"] == sha256_hex(JOB_PAYLOAD)
    assert doc["header"]["created_at"] == "2026-01-01T12:00:00Z"
    assert doc["header"]["expires_at"] == "2026-01-01T13:00:00Z"
    assert SignedMessage.model_validate_json(raw).header == header  # the documented model reads it


def test_canonical_json_is_exact():
    assert canonical_json({"b": [1, "é"], "a": {"d": None, "c": True}}) == (
        b'{"a":{"c":true,"d":null},"b":[1,"\\u00e9"]}'
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_an_answer_opens_when_bound_to_the_job_that_was_sent(coordinator, site):
    job = new_job()
    answer = reply_header(
        job,
        MessageKind.ANSWER,
        payload=ANSWER_PAYLOAD,
        payload_schema="lepton-answer/1",
        ttl=timedelta(hours=2),
        now=NOW,
    )
    assert isinstance(answer, AnswerHeader)
    assert answer.in_reply_to == JobRef(message_id=job.message_id, payload_sha256=job.payload_sha256)
    assert (answer.consortium, answer.run_id, answer.round, answer.site, answer.bucket) == (
        CONSORTIUM,
        RUN,
        3,
        SITE,
        BUCKET,
    )
    raw = seal(answer, ANSWER_PAYLOAD, site)
    key = object_key(answer)
    assert key.startswith(f"answers/{RUN}/0003/")
    got, payload = open_message(
        raw,
        expected=Expectation.for_reply(job, object_key=key),
        public_key=site.public_key_b64,
        seen_ids=set(),
        now=NOW + timedelta(minutes=30),
    )
    assert got == answer and payload == ANSWER_PAYLOAD


def test_a_refusal_is_a_reply_too(coordinator, site):
    job = new_job()
    refusal = reply_header(
        job,
        MessageKind.REFUSAL,
        payload=b'{"reasons": []}',
        payload_schema="lepton-refusal/1",
        ttl=timedelta(hours=1),
        now=NOW,
    )
    assert isinstance(refusal, RefusalHeader)
    raw = seal(refusal, b'{"reasons": []}', site)
    assert object_key(refusal).startswith(f"refusals/{RUN}/0003/")
    got, _ = open_message(
        raw,
        expected=Expectation.for_reply(job, object_key=object_key(refusal)),
        public_key=site.public_key_b64,
        seen_ids=set(),
        now=NOW,
    )
    assert got.kind is MessageKind.REFUSAL


def test_a_pinned_key_version_must_match_the_signature(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    v1 = PublicKey("coordinator", 1, coordinator.public_key_b64)
    open_message(raw, expected=job_expectation(header), public_key=v1, seen_ids=set(), now=NOW)
    v2 = PublicKey("coordinator", 2, coordinator.public_key_b64)
    err = rejected(
        lambda: open_message(raw, expected=job_expectation(header), public_key=v2, seen_ids=(), now=NOW)
    )
    assert err.reason_code is RejectReason.BAD_SIGNATURE and "version 2" in err.message


# ---------------------------------------------------------------------------------------------- forged


def test_a_message_signed_by_another_key_is_rejected(coordinator):
    header = new_job()
    impostor = LocalSigner()
    raw = seal(header, JOB_PAYLOAD, impostor)
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert err.reason_code is RejectReason.BAD_SIGNATURE
    assert err.field == "signature"
    assert fingerprint(coordinator.public_key_b64) in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("round", 4), ("site", "bank-b"), ("payload_sha256", "0" * 64), ("expires_at", "2027-01-01T00:00:00Z")],
)
def test_an_altered_header_breaks_the_signature(coordinator, field, value):
    header = new_job()
    raw = edit(seal(header, JOB_PAYLOAD, coordinator), lambda d: d["header"].__setitem__(field, value))
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert err.reason_code is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "vault:v1:",
        "vault:v0:" + "A" * 86 + "==",
        "vault:v1:" + "A" * 86,  # no padding
        "vault:v1:" + "A" * 85 + "B==",  # non-canonical base64
        "vault:v1:" + "-" * 86 + "==",  # URL-safe alphabet
        " vault:v1:" + "A" * 86 + "==",
        12345,
        None,
    ],
)
def test_a_malformed_signature_is_a_bad_signature(coordinator, signature):
    header = new_job()
    raw = edit(seal(header, JOB_PAYLOAD, coordinator), lambda d: d.__setitem__("signature", signature))
    assert rejected(lambda: open_job(raw, job_expectation(header), coordinator)).reason_code is (
        RejectReason.BAD_SIGNATURE
    )


def test_nothing_else_is_reported_before_the_signature_is_checked(coordinator):
    """A forged message that is also moved, replayed and expired says only: bad signature."""
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, LocalSigner())
    err = rejected(
        lambda: open_job(
            raw,
            job_expectation(header, object_key="jobs/elsewhere/0001/x.json", bucket="exchange-bank-b"),
            coordinator,
            seen_ids={header.message_id},
            now=NOW + timedelta(days=30),
        )
    )
    assert err.reason_code is RejectReason.BAD_SIGNATURE


# -------------------------------------------------------------------------------------------- tampered


def test_a_replaced_payload_is_tampered(coordinator):
    header = new_job()
    other = JOB_PAYLOAD.replace(b"3", b"4")  # same size
    raw = edit(
        seal(header, JOB_PAYLOAD, coordinator),
        lambda d: d.__setitem__("payload", base64.b64encode(other).decode()),
    )
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.TAMPERED_PAYLOAD, "header.payload_sha256")


def test_a_truncated_payload_is_tampered(coordinator):
    header = new_job()
    raw = edit(
        seal(header, JOB_PAYLOAD, coordinator),
        lambda d: d.__setitem__("payload", base64.b64encode(JOB_PAYLOAD[:-1]).decode()),
    )
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.TAMPERED_PAYLOAD, "header.payload_size")


@pytest.mark.parametrize("payload", ["not base64!", "QUJD\n", 17])
def test_a_payload_that_is_not_base64_is_tampered(coordinator, payload):
    header = new_job()
    raw = edit(seal(header, JOB_PAYLOAD, coordinator), lambda d: d.__setitem__("payload", payload))
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.TAMPERED_PAYLOAD, "payload")


# ----------------------------------------------------------------------------------------------- moved


def test_a_job_copied_to_another_key_is_moved(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    elsewhere = f"jobs/{RUN}/0003/{uuid.uuid4()}.json"
    err = rejected(lambda: open_job(raw, job_expectation(header, object_key=elsewhere), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.MOVED, "object_key")
    assert object_key(header) in err.message and elsewhere in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("bucket", "exchange-bank-b"), ("site", "bank-b"), ("consortium", "other-consortium")],
)
def test_a_job_for_another_site_bucket_or_consortium_is_moved(coordinator, field, value):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    err = rejected(lambda: open_job(raw, job_expectation(header, **{field: value}), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.MOVED, f"header.{field}")
    assert repr(value) in err.message


def test_a_job_read_where_an_answer_was_expected_is_the_wrong_kind(coordinator, site):
    job = new_job()
    raw = seal(job, JOB_PAYLOAD, coordinator)
    expected = Expectation.for_reply(
        job, object_key=object_key(job)
    )  # the coordinator reads its own job back
    err = rejected(
        lambda: open_message(raw, expected=expected, public_key=coordinator.public_key_b64, seen_ids=())
    )
    assert (err.reason_code, err.field) == (RejectReason.WRONG_KIND, "header.kind")


def test_an_unexpected_payload_schema_is_rejected(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    expected = job_expectation(header, payload_schemas=frozenset({"lepton-job/2"}))
    err = rejected(lambda: open_job(raw, expected, coordinator))
    assert (err.reason_code, err.field) == (RejectReason.WRONG_PAYLOAD_SCHEMA, "header.payload_schema")


# ---------------------------------------------------------------------------------------------- replay


def test_a_message_id_already_seen_is_a_replay(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    seen: set[uuid.UUID] = set()
    got, _ = open_job(raw, job_expectation(header), coordinator, seen_ids=seen)
    seen.add(got.message_id)  # the caller records it once processed
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator, seen_ids=seen))
    assert (err.reason_code, err.field) == (RejectReason.REPLAY, "header.message_id")


def test_a_job_of_another_run_or_round_is_a_replay(coordinator):
    header = new_job(round_=2)
    raw = seal(header, JOB_PAYLOAD, coordinator)
    err = rejected(lambda: open_job(raw, job_expectation(header, run_id="run-20251201"), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.REPLAY, "header.run_id")
    err = rejected(lambda: open_job(raw, job_expectation(header, round=3), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.REPLAY, "header.round")
    err = rejected(lambda: open_job(raw, job_expectation(header, round=None, min_round=3), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.REPLAY, "header.round")


def test_a_site_can_accept_the_first_job_of_a_run_it_does_not_know_yet(coordinator):
    header = new_job(round_=1)
    raw = seal(header, JOB_PAYLOAD, coordinator)
    got, _ = open_job(raw, job_expectation(header, run_id=None, round=None, min_round=0), coordinator)
    assert got.run_id == RUN


# ------------------------------------------------------------------------------------------------ time


def test_an_expired_message_is_rejected(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    open_job(raw, job_expectation(header), coordinator, now=header.expires_at - timedelta(seconds=1))
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator, now=header.expires_at))
    assert (err.reason_code, err.field) == (RejectReason.EXPIRED, "header.expires_at")


def test_a_message_from_the_future_is_not_yet_valid_beyond_the_clock_skew(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    open_job(raw, job_expectation(header), coordinator, now=NOW - timedelta(minutes=4))  # within 5 min skew
    err = rejected(
        lambda: open_job(raw, job_expectation(header), coordinator, now=NOW - timedelta(minutes=6))
    )
    assert (err.reason_code, err.field) == (RejectReason.NOT_YET_VALID, "header.created_at")


# --------------------------------------------------------------------------------------------- binding


def test_an_answer_to_another_job_is_unbound(site):
    job, other_job = new_job(), new_job()
    answer = reply_header(
        job,
        MessageKind.ANSWER,
        payload=ANSWER_PAYLOAD,
        payload_schema="lepton-answer/1",
        ttl=timedelta(hours=1),
        now=NOW,
    )
    raw = seal(answer, ANSWER_PAYLOAD, site)
    expected = Expectation.for_reply(other_job, object_key=object_key(answer))
    err = rejected(
        lambda: open_message(raw, expected=expected, public_key=site.public_key_b64, seen_ids=(), now=NOW)
    )
    assert (err.reason_code, err.field) == (RejectReason.UNBOUND_ANSWER, "header.in_reply_to.message_id")


def test_an_answer_to_a_job_with_other_content_is_unbound(site):
    """Same job id, but the site answered a job whose payload (weights, settings) was not the one sent."""
    job = new_job()
    seen_by_site = new_job(payload=b"other weights", message_id=job.message_id)
    answer = reply_header(
        seen_by_site,
        MessageKind.ANSWER,
        payload=ANSWER_PAYLOAD,
        payload_schema="lepton-answer/1",
        ttl=timedelta(hours=1),
        now=NOW,
    )
    raw = seal(answer, ANSWER_PAYLOAD, site)
    expected = Expectation.for_reply(job, object_key=object_key(answer))
    err = rejected(
        lambda: open_message(raw, expected=expected, public_key=site.public_key_b64, seen_ids=(), now=NOW)
    )
    assert (err.reason_code, err.field) == (RejectReason.UNBOUND_ANSWER, "header.in_reply_to.payload_sha256")


def test_an_answer_signed_by_another_site_is_forged(site):
    job = new_job()
    answer = reply_header(
        job,
        MessageKind.ANSWER,
        payload=ANSWER_PAYLOAD,
        payload_schema="lepton-answer/1",
        ttl=timedelta(hours=1),
        now=NOW,
    )
    raw = seal(answer, ANSWER_PAYLOAD, LocalSigner())  # bank-b's key, claiming to be bank-a
    expected = Expectation.for_reply(job, object_key=object_key(answer))
    err = rejected(
        lambda: open_message(raw, expected=expected, public_key=site.public_key_b64, seen_ids=(), now=NOW)
    )
    assert err.reason_code is RejectReason.BAD_SIGNATURE


def test_reply_headers_must_name_a_job_and_jobs_must_not():
    job = new_job()
    with pytest.raises(ValueError, match="in_reply_to"):
        make_header(
            MessageKind.ANSWER, consortium=CONSORTIUM, run_id=RUN, round=1, site=SITE, bucket=BUCKET,
            payload=b"", payload_schema="lepton-answer/1", ttl=timedelta(hours=1), now=NOW,
        )  # fmt: skip
    with pytest.raises(ValueError, match="in_reply_to"):
        new_job(in_reply_to=job_ref(job))
    with pytest.raises(ValidationError):  # a job header carrying in_reply_to does not validate
        JobHeader.model_validate({**job.model_dump(), "in_reply_to": job_ref(job).model_dump()})


def test_expecting_a_reply_needs_the_job():
    with pytest.raises(ValidationError, match="answers_job"):
        Expectation(
            consortium=CONSORTIUM, site=SITE, bucket=BUCKET, object_key="answers/x/0001/y.json",
            kinds=frozenset({MessageKind.ANSWER}),
        )  # fmt: skip


# ------------------------------------------------------------------------------------- versions, shape


def test_an_unknown_envelope_version_is_rejected(coordinator):
    header = new_job()
    raw = edit(seal(header, JOB_PAYLOAD, coordinator), lambda d: d.__setitem__("schema_version", 2))
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.UNKNOWN_SCHEMA_VERSION, "schema_version")


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_an_unknown_header_version_is_rejected_even_when_properly_signed(coordinator, version):
    header = new_job()
    raw = resign(
        seal(header, JOB_PAYLOAD, coordinator),
        coordinator,
        lambda h: h.__setitem__("schema_version", version),
    )
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.UNKNOWN_SCHEMA_VERSION, "header.schema_version")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"\xff\xfe", None),
        (b"not json", None),
        (b"[1, 2]", None),
        (b'{"schema_version": 1, "schema_version": 1}', "schema_version"),
        (b'{"header": {}}', "schema_version"),
        (b'{"schema_version": 1, "header": {}, "signature": "x"}', "payload"),
        (b'{"schema_version": 1, "header": [], "signature": "x", "payload": ""}', "header"),
        (b'{"schema_version": 1, "header": {}, "signature": "x", "payload": "", "note": 1}', "note"),
        (b'{"schema_version": NaN}', None),
    ],
)
def test_what_is_not_an_envelope_is_malformed(coordinator, raw, field):
    header = new_job()
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.MALFORMED, field)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda h: h.pop("run_id"), "header.run_id"),
        (lambda h: h.__setitem__("round", "3"), "header.round"),
        (lambda h: h.__setitem__("extra", 1), "header.extra"),
        (lambda h: h.__setitem__("kind", "gossip"), "header.kind"),
        (lambda h: h.__setitem__("created_at", "2026-01-01T12:00:00"), "header.created_at"),  # naive
        (lambda h: h.__setitem__("site", "../bank-b"), "header.site"),
        (lambda h: h.__setitem__("message_id", str(uuid.uuid1())), "header.message_id"),  # not a v4 uuid
    ],
)
def test_a_signed_but_invalid_header_is_malformed_and_names_the_field(coordinator, mutate, field):
    header = new_job()
    raw = resign(seal(header, JOB_PAYLOAD, coordinator), coordinator, mutate)
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.MALFORMED, field)
    assert field in err.message


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.__setitem__("created_at", "2026-01-01T13:00:00+01:00"),  # the same instant, not UTC
        lambda h: h.__setitem__("message_id", h["message_id"].upper()),
    ],
)
def test_a_non_canonical_header_is_malformed(coordinator, mutate):
    header = new_job()
    raw = resign(seal(header, JOB_PAYLOAD, coordinator), coordinator, mutate)
    err = rejected(lambda: open_job(raw, job_expectation(header), coordinator))
    assert (err.reason_code, err.field) == (RejectReason.MALFORMED, "header")


def test_an_oversized_object_is_rejected_before_parsing(coordinator):
    header = new_job()
    raw = seal(header, JOB_PAYLOAD, coordinator)
    err = rejected(
        lambda: open_job(raw, job_expectation(header).model_copy(update={"max_bytes": 100}), coordinator)
    )
    assert err.reason_code is RejectReason.OVERSIZED


def test_rejections_are_reportable():
    err = MessageRejected(RejectReason.REPLAY, "header.round is 2, expected 3", field="header.round")
    assert str(err) == "replay: header.round is 2, expected 3"
    assert err.to_dict() == {
        "reason_code": "replay",
        "field": "header.round",
        "message": "header.round is 2, expected 3",
    }


# ------------------------------------------------------------------------------------------ seal, keys


def test_seal_refuses_a_header_that_does_not_describe_the_payload(coordinator):
    with pytest.raises(ValueError, match="payload"):
        seal(new_job(), b"something else", coordinator)


def test_seal_refuses_a_signer_that_returns_garbage():
    class Broken:
        def sign(self, data: bytes) -> str:
            return "hmac:v1:abc"

    with pytest.raises(ValueError, match="vault:v"):
        seal(new_job(), JOB_PAYLOAD, Broken())


def test_headers_are_frozen_and_strict():
    header = new_job()
    with pytest.raises(ValidationError):
        header.round = 4
    with pytest.raises(ValidationError, match="expires_at"):
        JobHeader.model_validate({**header.model_dump(), "expires_at": NOW - timedelta(seconds=1)})
    with pytest.raises(ValueError, match="ttl"):
        new_job(ttl=timedelta(0))
    assert parse_header(json.loads(json.dumps(header.model_dump(mode="json")))) == header


def test_object_keys_parse_back_and_sort_by_round():
    header = new_job(round_=7)
    parts = parse_object_key(object_key(header))
    assert (parts.kind, parts.run_id, parts.round, parts.message_id) == (
        MessageKind.JOB,
        RUN,
        7,
        header.message_id,
    )
    assert object_key(new_job(round_=12345)).split("/")[2] == "12345"
    assert prefix_for(MessageKind.ANSWER) == "answers/"
    assert prefix_for(MessageKind.ANSWER, RUN, 7) == f"answers/{RUN}/0007/"
    with pytest.raises(ValueError):
        prefix_for(MessageKind.JOB, round=1)
    for bad in (
        f"jobs/{RUN}/7/{header.message_id}.json",
        f"jobs/{RUN}/00007/{header.message_id}.json",  # non-canonical padding
        f"jobs/{RUN}/0007/{str(header.message_id).upper()}.json",
        f"inbox/{RUN}/0007/{header.message_id}.json",
        f"jobs/../0007/{header.message_id}.json",
        f"jobs/{RUN}/0007/{header.message_id}.json.bak",
    ):
        with pytest.raises(ValueError):
            parse_object_key(bad)


def test_every_reject_reason_is_exercised_by_this_file():
    """Keeps the enum and the tests in step: a new reason needs a test that produces it."""
    source = Path(__file__).read_text(encoding="utf-8")
    for reason in RejectReason:
        assert f"RejectReason.{reason.name}" in source.split("def test_every_reject_reason")[0], reason


# -------------------------------------------------------------------------------------- offline verify


def test_offline_verification_and_strict_signature_parsing(coordinator):
    sig = coordinator.sign(b"data")
    assert verify(coordinator.public_key_b64, b"data", sig)
    assert verify(coordinator.public_key_b64, b"data", sig, key_version=1)
    assert not verify(coordinator.public_key_b64, b"data", sig, key_version=2)
    assert not verify(coordinator.public_key_b64, b"Data", sig)
    assert not verify(LocalSigner().public_key_b64, b"data", sig)
    assert not verify(coordinator.public_key_b64, b"data", sig.replace("vault:v1:", "vault:v1: "))
    parsed = parse_signature(sig)
    assert parsed.key_version == 1 and len(parsed.signature) == 64 and str(parsed) == sig
    assert parse_signature("vault:v12:" + sig.split(":")[2]).key_version == 12
    for bad in ("vault:v01:" + sig.split(":")[2], sig + "\n", sig.replace("vault", "VAULT")):
        with pytest.raises(ValueError):
            parse_signature(bad)


def test_a_malformed_public_key_is_a_configuration_error(coordinator):
    sig = coordinator.sign(b"data")
    for bad in ("", "AAAA", coordinator.public_key_b64.rstrip("="), base64.b64encode(b"x" * 33).decode()):
        with pytest.raises(ValueError):
            verify(bad, b"data", sig)
    with pytest.raises(ValueError):
        load_public_key(coordinator.public_key_b64 + "\n")


def test_fingerprints_are_sha256_of_the_raw_key_in_groups():
    raw = bytes(range(32))
    b64 = base64.b64encode(raw).decode()
    digest = hashlib.sha256(raw).hexdigest()
    fp = fingerprint(b64)
    assert fp.replace(" ", "") == digest
    assert len(fp.split(" ")) == 16 and all(len(g) == 4 for g in fp.split(" "))
    assert normalize_fingerprint(digest.upper()) == fp
    assert normalize_fingerprint(":".join(digest[i : i + 2] for i in range(0, 64, 2))) == fp
    with pytest.raises(ValueError):
        normalize_fingerprint(digest[:-1])
