"""The secure-aggregation messages: strict schemas whose errors name the field, and envelopes that open only
for the site, run, round and aggregation they were sealed for.

A local Ed25519 key stands in for the Vault signers (tests/integration/test_secagg_exchange.py uses OpenBao).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core.exchange import (
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RejectReason,
    canonical_json,
    make_header,
    object_key,
    seal,
)
from lepton_tasks.core.messages import MessageError, RoundRefusal, dump, load
from lepton_tasks.core.secagg_messages import (
    SECAGG_MODELS,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggPayload,
    SecAggReveal,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSurvivors,
    aggregation_round_id,
    masked_key,
    open_payload,
    seal_answer,
    seal_job,
    seal_refusal,
)
from lepton_tasks.ops.schemas import render
from tests.unit.site.fakes import LocalSigner

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGG = uuid.UUID("8f3c2b1a-4d5e-4f60-8a7b-9c0d1e2f3a4b")
SITES = ["bank-a", "bank-b", "bank-c"]
TTL = timedelta(hours=1)


def _key(fill: int) -> str:
    return base64.b64encode(bytes([fill]) * 32).decode()


def _bind(site: str = "bank-a", round_: int = 3) -> dict[str, Any]:
    return {
        "consortium": "credit-risk",
        "run_id": "run-1",
        "round": round_,
        "site": site,
        "aggregation_id": str(AGG),
    }


def _share(sender: str, recipient: str) -> dict[str, Any]:
    return {
        "sender": sender,
        "recipient": recipient,
        "nonce": base64.b64encode(b"\x01" * 12).decode(),
        "ciphertext": base64.b64encode(b"\x02" * 82).decode(),
    }


#: one valid document of every payload (JSON form, as it travels)
VALID: dict[type[SecAggPayload], dict[str, Any]] = {
    SecAggSetup: {
        **_bind(),
        "purpose": "update",
        "sites": SITES,
        "threshold": 2,
        "update": {"shapes": [[4, 3], [3]], "clip": 8.0, "max_samples": 1000},
    },
    SecAggKeys: {**_bind(), "c_pk": _key(1), "s_pk": _key(2)},
    SecAggRoster: {
        **_bind(),
        "keys": [{"site": s, "c_pk": _key(i), "s_pk": _key(i + 9)} for i, s in enumerate(SITES)],
    },
    SecAggShares: {**_bind(), "shares": [_share("bank-a", s) for s in SITES]},
    SecAggInbox: {**_bind(), "shared": SITES, "shares": [_share(s, "bank-a") for s in SITES]},
    SecAggMasked: {
        **_bind(),
        "masked": {"key": masked_key("run-1", 3, AGG), "sha256": "ab" * 32, "size": 64},
        "bits": 32,
        "length": 16,
    },
    SecAggSurvivors: {**_bind(), "survivors": SITES},
    SecAggReveal: {
        **_bind(),
        "b_shares": {"bank-b": {"index": 1, "value": base64.b64encode(b"\x03" * 16).decode()}},
        "s_sk_shares": {"bank-c": {"index": 1, "value": base64.b64encode(b"\x04" * 32).decode()}},
    },
}


def test_every_payload_model_has_a_valid_example_and_an_exported_schema():
    assert set(VALID) == set(SECAGG_MODELS.values())
    schemas = render()
    for name, model in SECAGG_MODELS.items():
        assert f"{name}.schema.json" in schemas
        assert json.loads(schemas[f"{name}.schema.json"])["properties"]["schema_version"]["const"] == 1
        assert model.payload_schema.endswith("/1")


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_a_payload_round_trips_through_json(model: type[SecAggPayload]):
    doc = VALID[model]
    parsed = load(model, json.dumps(doc), where="s3://x/y")
    out = dump(parsed)
    assert {k: out[k] for k in doc} == doc and out["schema_version"] == 1
    assert load(model, canonical_json(out), where="again") == parsed
    assert parsed.schema_version == 1 and parsed.aggregation_id == AGG


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_each_missing_required_field_is_named(model: type[SecAggPayload]):
    doc = VALID[model]
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    assert {"consortium", "run_id", "round", "site", "aggregation_id"} <= set(required)
    for name in required:
        with pytest.raises(MessageError, match=rf"field {name}: Field required"):
            load(model, {k: v for k, v in doc.items() if k != name}, where="s3://x/y")


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_an_unknown_field_is_named(model: type[SecAggPayload]):
    with pytest.raises(
        MessageError, match=r"s3://x/y: invalid .*field sneaky: Extra inputs are not permitted"
    ):
        load(model, {**VALID[model], "sneaky": 1}, where="s3://x/y")


@pytest.mark.parametrize(
    ("model", "field", "value", "where", "says"),
    [
        (SecAggKeys, "round", "three", "round", "valid integer"),
        (SecAggKeys, "round", -1, "round", "greater than or equal to 0"),
        (SecAggKeys, "site", "Bank A", "site", "pattern"),
        (SecAggKeys, "aggregation_id", "not-a-uuid", "aggregation_id", "UUID"),
        (SecAggKeys, "c_pk", "!!!!", "c_pk", "not standard base64"),
        (SecAggKeys, "c_pk", base64.b64encode(b"\x01" * 31).decode(), "c_pk", "must be 32 bytes"),
        (SecAggKeys, "s_pk", 12, "s_pk", "expected a standard base64 string"),
        (SecAggKeys, "c_pk", _key(1).rstrip("="), "c_pk", "not standard base64"),
        (SecAggKeys, "schema_version", 2, "schema_version", "Input should be 1"),
        (SecAggSetup, "threshold", 1, "threshold", "greater than or equal to 2"),
        (SecAggSetup, "bits", 16, "bits", "Input should be 32 or 64"),
        (SecAggSetup, "purpose", "median", "purpose", "'update' or 'statistics'"),
        (SecAggSetup, "sites", ["bank-a", "bank-b"], "sites", "at least 3 items"),
        (SecAggMasked, "masked", {"key": "k", "sha256": "nothex", "size": 1}, "masked.sha256", "pattern"),
        (
            SecAggShares,
            "shares",
            [{**_share("bank-a", "bank-b"), "nonce": _key(1)}],
            "shares.0.nonce",
            "12 bytes",
        ),
        (
            SecAggReveal,
            "b_shares",
            {"bank-b": {"index": 0, "value": _key(1)}},
            "b_shares.bank-b.index",
            "greater than or equal to 1",
        ),
        (SecAggReveal, "b_shares", {"bank-b": {"index": 1, "value": "AAAA"}}, "b_shares.bank-b.value", "16"),
    ],
)
def test_a_mistyped_field_is_named(model, field, value, where, says):
    with pytest.raises(MessageError) as err:
        load(model, {**VALID[model], field: value}, where="s3://x/y")
    text = str(err.value)
    assert f"field {where}:" in text
    assert says.lower() in text.lower()


@pytest.mark.parametrize(
    ("model", "change", "says"),
    [
        (SecAggSetup, {"site": "bank-z"}, "addressee 'bank-z' is not among the sites"),
        (SecAggSetup, {"sites": ["bank-a", "bank-b", "bank-a"]}, "lists bank-a more than once"),
        (SecAggSetup, {"purpose": "statistics"}, "statistics layout"),
        (SecAggSetup, {"update": {"shapes": [[0]], "clip": 1.0, "max_samples": 1}}, "no parameter"),
        (SecAggSetup, {"update": {"shapes": [[2]], "clip": float("inf"), "max_samples": 1}}, "finite"),
        (SecAggShares, {"shares": [_share("bank-b", "bank-c")]}, "name other senders: bank-b"),
        (SecAggShares, {"shares": [_share("bank-a", "bank-b")] * 2}, "bank-b more than once"),
        (SecAggInbox, {"shared": ["bank-a", "bank-b"]}, "shares from sites outside shared: bank-c"),
        (SecAggMasked, {"length": 15}, "not length 15 x 4 bytes"),
        (
            SecAggRoster,
            {"keys": [{"site": "bank-a", "c_pk": _key(1), "s_pk": _key(2)}] * 2},
            "more than once",
        ),
        (SecAggSurvivors, {"survivors": ["bank-a", "bank-a"]}, "more than once"),
        (
            SecAggReveal,
            {"s_sk_shares": {"bank-b": {"index": 1, "value": _key(4)}}},
            "both secrets of bank-b revealed",
        ),
    ],
)
def test_inconsistent_payloads_are_refused_with_the_reason(model, change, says):
    with pytest.raises(MessageError, match=says):
        load(model, {**VALID[model], **change}, where="s3://x/y")


def test_the_round_id_binds_every_public_field():
    setup = load(SecAggSetup, VALID[SecAggSetup], where="x")
    assert setup.round_id == aggregation_round_id("credit-risk", "run-1", 3, "update", AGG)
    others = {
        aggregation_round_id("credit-risk", "run-1", 4, "update", AGG),
        aggregation_round_id("credit-risk", "run-2", 3, "update", AGG),
        aggregation_round_id("credit-risk", "run-1", 3, "statistics", AGG),
        aggregation_round_id("credit-risk", "run-1", 3, "update", uuid.uuid4()),
        aggregation_round_id("other", "run-1", 3, "update", AGG),
    }
    assert setup.round_id not in others and len(others) == 5


# ------------------------------------------------------------------------------------------------ envelopes


@pytest.fixture
def coordinator() -> LocalSigner:
    return LocalSigner("coordinator")


@pytest.fixture
def site() -> LocalSigner:
    return LocalSigner("bank-a")


def _expect_job(key: str, *, site: str = "bank-a", round_: int = 3) -> Expectation:
    return Expectation.for_job(
        consortium="credit-risk",
        site=site,
        bucket=f"exchange-{site}",
        object_key=key,
        run_id="run-1",
        round=round_,
    )


def _roster(site: str = "bank-a", round_: int = 3) -> SecAggRoster:
    return load(SecAggRoster, {**VALID[SecAggRoster], **_bind(site, round_)}, where="x")


def test_a_sealed_job_opens_for_its_site_and_round(coordinator):
    header, raw = seal_job(_roster(), bucket="exchange-bank-a", signer=coordinator, ttl=TTL, now=NOW)
    opened, payload = open_payload(
        raw,
        SecAggRoster,
        expected=_expect_job(object_key(header)),
        public_key=coordinator.public_key(),
        seen_ids=set(),
        aggregation_id=AGG,
        now=NOW,
    )
    assert opened == header and payload == _roster()
    assert header.payload_schema == "lepton-secagg-roster/1"


def _rejected(raw: bytes, key: str, signer: LocalSigner, **kw: Any) -> MessageRejected:
    expected = kw.pop("expected", None) or _expect_job(key)
    model = kw.pop("model", SecAggRoster)
    with pytest.raises(MessageRejected) as err:
        open_payload(
            raw,
            model,
            expected=expected,
            public_key=signer.public_key(),
            seen_ids=kw.pop("seen", set()),
            now=NOW,
            **kw,
        )
    return err.value


def test_forged_moved_replayed_and_tampered_jobs_are_rejected_with_their_reason(coordinator):
    header, raw = seal_job(_roster(), bucket="exchange-bank-a", signer=coordinator, ttl=TTL, now=NOW)
    key = object_key(header)

    forger = LocalSigner("forger")
    _, forged = seal_job(_roster(), bucket="exchange-bank-a", signer=forger, ttl=TTL, now=NOW)
    assert _rejected(forged, key, coordinator).reason_code is RejectReason.BAD_SIGNATURE

    moved = _rejected(raw, key, coordinator, expected=_expect_job(key, site="bank-b"))
    assert (moved.reason_code, moved.field) == (RejectReason.MOVED, "header.site")

    old_header, old = seal_job(
        _roster(round_=2), bucket="exchange-bank-a", signer=coordinator, ttl=TTL, now=NOW
    )
    replayed = _rejected(old, object_key(old_header), coordinator)
    assert (replayed.reason_code, replayed.field) == (RejectReason.REPLAY, "header.round")
    again = _rejected(raw, key, coordinator, seen={header.message_id})
    assert (again.reason_code, again.field) == (RejectReason.REPLAY, "header.message_id")

    doc = json.loads(raw)
    body = json.loads(base64.b64decode(doc["payload"]))
    body["keys"][0]["c_pk"] = _key(7)
    doc["payload"] = base64.b64encode(canonical_json(body)).decode()
    tampered = _rejected(canonical_json(doc), key, coordinator)
    assert tampered.reason_code is RejectReason.TAMPERED_PAYLOAD

    other = _rejected(raw, key, coordinator, aggregation_id=uuid.uuid4())
    assert (other.reason_code, other.field) == (RejectReason.REPLAY, "payload.aggregation_id")

    wrong = _rejected(raw, key, coordinator, model=SecAggSurvivors)
    assert wrong.reason_code is RejectReason.WRONG_PAYLOAD_SCHEMA


def test_a_payload_bound_to_another_site_or_round_than_its_signed_header_is_rejected(coordinator):
    """The envelope is genuine (signed by the coordinator) but its payload names another site: moved."""
    for change, reason, field in (
        ({"site": "bank-b"}, RejectReason.MOVED, "payload.site"),
        ({"round": 4}, RejectReason.REPLAY, "payload.round"),
        ({"run_id": "run-0"}, RejectReason.REPLAY, "payload.run_id"),
    ):
        body = canonical_json({**dump(_roster()), **change})
        header = make_header(
            MessageKind.JOB,
            consortium="credit-risk",
            run_id="run-1",
            round=3,
            site="bank-a",
            bucket="exchange-bank-a",
            payload=body,
            payload_schema=SecAggRoster.payload_schema,
            ttl=TTL,
            now=NOW,
        )
        err = _rejected(seal(header, body, coordinator), object_key(header), coordinator)
        assert (err.reason_code, err.field) == (reason, field)


def test_a_malformed_payload_under_a_good_signature_names_the_payload_field(coordinator):
    body = canonical_json({**dump(_roster()), "keys": []})
    header = make_header(
        MessageKind.JOB,
        consortium="credit-risk",
        run_id="run-1",
        round=3,
        site="bank-a",
        bucket="exchange-bank-a",
        payload=body,
        payload_schema=SecAggRoster.payload_schema,
        ttl=TTL,
        now=NOW,
    )
    err = _rejected(seal(header, body, coordinator), object_key(header), coordinator)
    assert (err.reason_code, err.field) == (RejectReason.MALFORMED, "payload.keys")


def test_answers_and_refusals_are_bound_to_the_job_they_answer(coordinator, site):
    job, _ = seal_job(_roster(), bucket="exchange-bank-a", signer=coordinator, ttl=TTL, now=NOW)
    assert isinstance(job, JobHeader)
    keys = load(SecAggKeys, VALID[SecAggKeys], where="x")
    answer, raw = seal_answer(job, keys, signer=site, ttl=TTL, now=NOW)
    opened, payload = open_payload(
        raw,
        SecAggKeys,
        expected=Expectation.for_reply(job, object_key=object_key(answer)),
        public_key=site.public_key(),
        seen_ids=set(),
        aggregation_id=AGG,
        allow_refusal=True,
        now=NOW,
    )
    assert opened.kind is MessageKind.ANSWER and payload == keys

    refusal, raw_r = seal_refusal(
        job, [{"code": "x", "field": "f", "message": "m"}], signer=site, ttl=TTL, now=NOW
    )
    _, refused = open_payload(
        raw_r,
        SecAggKeys,
        expected=Expectation.for_reply(job, object_key=object_key(refusal)),
        public_key=site.public_key(),
        seen_ids=set(),
        allow_refusal=True,
        now=NOW,
    )
    assert isinstance(refused, RoundRefusal) and refused.reasons[0]["code"] == "x"

    # an answer to another job (e.g. of an earlier phase) does not bind to this one
    other_job, _ = seal_job(_roster(), bucket="exchange-bank-a", signer=coordinator, ttl=TTL, now=NOW)
    err = _rejected(
        raw,
        object_key(answer),
        site,
        model=SecAggKeys,
        expected=Expectation.for_reply(other_job, object_key=object_key(answer)),
    )
    assert err.reason_code is RejectReason.UNBOUND_ANSWER

    with pytest.raises(ValueError, match="bound to"):
        seal_answer(
            job, load(SecAggKeys, {**VALID[SecAggKeys], "site": "bank-b"}, where="x"), signer=site, ttl=TTL
        )
    with pytest.raises(ValueError, match="is a job"):
        seal_answer(job, _roster(), signer=site, ttl=TTL)
    with pytest.raises(ValueError, match="is an answer"):
        seal_job(keys, bucket="exchange-bank-a", signer=coordinator, ttl=TTL)


# ------------------------------------------------------------------------------------------------ layouts


def test_an_update_layout_is_encoded_weighted_and_refused_beyond_its_clip():
    from lepton_tasks.core.secagg_messages import UpdateLayout
    from lepton_tasks.federation.secagg_round import UpdateCodec

    codec = UpdateCodec(UpdateLayout(shapes=[[2, 2], [1]], clip=2.0, max_samples=10), max_sites=3)
    update = [np.array([[0.5, -1.0], [1.5, 0.0]], np.float32), np.array([0.25], np.float32)]
    ring = codec.encode(update, 4)
    assert ring.dtype == np.uint32 and ring.size == codec.length == 6 and int(ring[-1]) == 4
    mean, n = codec.decode(ring, 1)
    assert n == 4 and all(
        np.abs(m - u).max() <= codec.error_bound() for m, u in zip(mean, update, strict=True)
    )
    with pytest.raises(ValueError, match="1 of the update's 5 values exceed the aggregation's clip bound 2"):
        codec.encode([update[0] * 2, update[1]], 4)
    with pytest.raises(ValueError, match=r"shapes \[\[4\], \[1\]\] are not the aggregation's"):
        codec.encode([update[0].reshape(-1), update[1]], 4)
    with pytest.raises(ValueError, match="n_samples must be in"):
        codec.encode(update, 11)


def test_statistics_layouts_come_from_declared_ranges_or_a_given_bound():
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.federation.secagg_round import statistics_layout

    banks = statistics_layout(load_contract("banks"))
    assert banks.bounds == {"balance": 5000.0, "income": 250000.0} and banks.max_rows == 10_000_000
    hospitals = load_contract("hospitals")
    with pytest.raises(ValueError, match="numeric feature 'mean_radius' of hospitals@v1 declares no range"):
        statistics_layout(hospitals)
    numeric = [c for c, s in hospitals.columns.items() if s.role == "feature" and s.is_numeric()]
    layout = statistics_layout(hospitals, bounds=dict.fromkeys(numeric, 5000.0), max_rows=10_000)
    assert layout.max_rows == 10_000 and set(layout.bounds) == set(numeric)
    with pytest.raises(ValueError, match="not numeric features"):
        statistics_layout(hospitals, bounds={"diagnosis": 1.0})


def test_statistics_encode_exactly_in_every_count_and_refuse_what_the_layout_cannot_hold():
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.features import CategoricalStats, NumericStats, SufficientStats, merge
    from lepton_tasks.federation.secagg_round import StatisticsCodec, statistics_layout

    contract = load_contract("banks")
    codec = StatisticsCodec(contract, statistics_layout(contract, max_rows=1000), max_sites=3)

    def stats(rows: int, income: float, students: int) -> SufficientStats:
        return SufficientStats(
            dataset="banks",
            contract_version=1,
            rows=rows,
            numeric={
                "balance": NumericStats(count=rows, sum=10.5 * rows, sum_sq=110.25 * rows),
                "income": NumericStats(count=rows - 1, sum=income, sum_sq=income**2, null_count=1),
            },
            categorical={"student": CategoricalStats(counts={"Yes": students}, null_count=rows - students)},
            label_counts={"No": rows},
        )

    parts = [stats(10, 1234.5, 3), stats(20, 99.0, 0)]
    total = codec.encode(parts[0]) + codec.encode(parts[1])  # the ring sum (uint64 wraps mod 2^64)
    got, plain = codec.decode(total, 2), merge(parts)
    assert got.model_dump(exclude={"numeric"}) == plain.model_dump(exclude={"numeric"})
    bounds = codec.error_bounds(2)
    for c in ("balance", "income"):
        assert abs(got.numeric[c].sum - plain.numeric[c].sum) <= bounds[f"{c}.sum"]
        assert abs(got.numeric[c].sum_sq - plain.numeric[c].sum_sq) <= bounds[f"{c}.sum_sq"]
    assert got.categorical["student"].counts == {"Yes": 3}  # a zero count is absent, as in the plain merge

    with pytest.raises(ValueError, match="'student' has counts under keys outside its vocabulary"):
        codec.encode(
            stats(10, 1.0, 3).model_copy(
                update={"categorical": {"student": CategoricalStats(counts={"Maybe": 1})}}
            )
        )
    with pytest.raises(ValueError, match=r"count 'rows' is outside \[0, max_rows = 1000\]"):
        codec.encode(stats(1001, 1.0, 3))
    with pytest.raises(ValueError, match=r"income\.sum_sq exceed the layout's bound"):
        codec.encode(stats(10, 1000 * 250_000.0, 3))
