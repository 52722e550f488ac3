"""Coordinator side of a round: send signed jobs with their global weights, collect and judge the replies.

Every bad reply excludes only its site, with a reason; the coordinator's own mistakes raise before anything
is written. Local Ed25519 keys and a dict stand in for Vault and S3 (tests/unit/site/fakes.py).
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import weights
from lepton_tasks.core.exchange import (
    Expectation,
    JobHeader,
    MessageKind,
    canonical_json,
    job_ref,
    make_header,
    object_key,
    open_message,
    prefix_for,
    reply_header,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import BlobRef, RoundAnswer, RoundJob, RoundRefusal, dump, load
from lepton_tasks.federation.aggregate import fedavg
from lepton_tasks.federation.enrollment import (
    EnrollmentError,
    SiteEntry,
    SiteRegistry,
    pin_site_key,
)
from lepton_tasks.federation.exchange import (
    ALL_SITES,
    SiteStatus,
    collect_answers,
    global_weights_key,
    send_round,
    update_key,
)
from tests.unit.site.fakes import CONSORTIUM, RUN, LocalSigner, MemoryStorage, round_job

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SITES = ("bank-a", "bank-b", "bank-c")
GLOBAL = weights.dumps([np.zeros((2, 2), np.float32), np.zeros(2, np.float32)], {"round": 0})


@dataclass
class World:
    coordinator: LocalSigner
    sites: dict[str, LocalSigner]
    storage: MemoryStorage
    registry: SiteRegistry

    def send(self, round: int = 1, **kw: Any) -> dict[str, JobHeader]:
        args: dict[str, Any] = {
            "consortium": CONSORTIUM,
            "run_id": RUN,
            "round": round,
            "jobs": {s: round_job() for s in SITES},
            "blobs": {ALL_SITES: GLOBAL},
            "now": NOW,
        }
        args.update(kw)
        return send_round(self.storage, self.coordinator, self.registry, **args)  # type: ignore[arg-type]

    def collect(self, sent: dict[str, JobHeader], **kw: Any) -> Any:
        args: dict[str, Any] = {"seen_ids": set(), "now": NOW + timedelta(minutes=5)}
        args.update(kw)
        return collect_answers(self.storage, self.registry, sent, **args)  # type: ignore[arg-type]

    def answer(
        self,
        job: JobHeader,
        *,
        delta: float = 1.0,
        n: int = 100,
        signer: LocalSigner | None = None,
        update: bytes | None = None,
        ref: BlobRef | None = None,
        created: datetime = NOW + timedelta(minutes=1),
        payload: bytes | None = None,
    ) -> str:
        """Write a site's answer (update blob, then the sealed answer) as the site would; return its key."""
        answer_id = uuid.uuid4()
        if update is None:
            update = weights.dumps([np.full((2, 2), delta, np.float32), np.full(2, delta, np.float32)])
        key = update_key(job.run_id, job.round, answer_id)
        self.storage.put_bytes(job.bucket, key, update)
        ref = ref or BlobRef(key=key, sha256=sha256_hex(update), size=len(update))
        body = payload or canonical_json(
            dump(RoundAnswer(mode="train", n_samples=n, metrics={"loss": 0.5}, update=ref))
        )
        header = make_header(
            MessageKind.ANSWER,
            consortium=job.consortium,
            run_id=job.run_id,
            round=job.round,
            site=job.site,
            bucket=job.bucket,
            payload=body,
            payload_schema=RoundAnswer.payload_schema,
            ttl=timedelta(days=7),
            in_reply_to=job_ref(job),
            now=created,
            message_id=answer_id,
        )
        self.storage.put_bytes(
            job.bucket, object_key(header), seal(header, body, signer or self.sites[job.site])
        )
        return object_key(header)

    def refuse(self, job: JobHeader, code: str = "strategy_not_allowed") -> str:
        body = canonical_json(
            dump(RoundRefusal(reasons=[{"code": code, "field": "strategy", "message": "no"}]))
        )
        header = reply_header(
            job,
            MessageKind.REFUSAL,
            payload=body,
            payload_schema=RoundRefusal.payload_schema,
            ttl=timedelta(days=7),
            now=NOW + timedelta(minutes=1),
        )
        self.storage.put_bytes(job.bucket, object_key(header), seal(header, body, self.sites[job.site]))
        return object_key(header)


@pytest.fixture
def world(tmp_path: Path) -> World:
    registry = SiteRegistry(tmp_path / "sites.yaml")
    storage = MemoryStorage()
    sites = {}
    for site in SITES:
        sites[site] = LocalSigner(site)
        storage.ensure_bucket(f"exchange-{site}")
        registry.put(
            SiteEntry(
                site=site,
                consortium=CONSORTIUM,
                bucket=f"exchange-{site}",
                s3_user=f"exchange-{site}",
                enrolled_at=NOW,
            )
        )
        pin_site_key(registry, site, sites[site].public_key_b64, sites[site].fingerprint, now=NOW)
    return World(LocalSigner("coordinator"), sites, storage, registry)


# ---------------------------------------------------------------------------------------------------- send


def test_send_writes_the_weights_then_the_sealed_job_into_each_sites_bucket(world):
    sent = world.send(blobs={ALL_SITES: GLOBAL, "bank-c": b"bank-c's own start"})
    assert sorted(sent) == list(SITES)
    for site, header in sent.items():
        bucket = f"exchange-{site}"
        blob = b"bank-c's own start" if site == "bank-c" else GLOBAL
        weights_key = global_weights_key(RUN, 1, sha256_hex(blob))
        assert world.storage.puts(bucket) == [weights_key, object_key(header)]  # the job commits
        assert (header.site, header.bucket, header.round, header.run_id) == (site, bucket, 1, RUN)
        assert header.expires_at == NOW + timedelta(hours=24)
        opened, payload = open_message(
            world.storage.get_bytes(bucket, object_key(header)),
            expected=Expectation.for_job(
                consortium=CONSORTIUM, site=site, bucket=bucket, object_key=object_key(header)
            ),
            public_key=world.coordinator.public_key_b64,
            seen_ids=set(),
            now=NOW,
        )
        job = load(RoundJob, payload, where="test")
        assert opened == header and job.global_weights == BlobRef(
            key=weights_key, sha256=sha256_hex(blob), size=len(blob)
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda w: w.registry.delete("bank-b"), "not enrolled"),
        (
            lambda w: w.registry.put(w.registry.get("bank-b").model_copy(update={"consortium": "other-one"})),
            "enrolled in 'other-one'",
        ),
        (
            lambda w: w.registry.put(
                w.registry.get("bank-b").model_copy(
                    update={"public_key": None, "key_version": None, "fingerprint": None, "pinned_at": None}
                )
            ),
            "no pinned key",
        ),
    ],
)
def test_sending_to_a_site_not_ready_writes_nothing(world, change, match):
    change(world)
    with pytest.raises(EnrollmentError, match=match):
        world.send()
    assert world.storage.puts() == []


def test_blob_mistakes_are_the_coordinators_and_write_nothing(world):
    with pytest.raises(ValueError, match="blobs for sites that get no job: bank-z"):
        world.send(blobs={"bank-z": b"x"})
    ref = BlobRef(key="jobs/x", sha256="0" * 64, size=1)
    with pytest.raises(ValueError, match="names global weights"):
        world.send(jobs={s: round_job(global_weights=ref) for s in SITES}, blobs={})
    assert world.storage.puts() == []


# ------------------------------------------------------------------------------------------------- collect


def test_a_round_where_every_site_answers_is_complete_and_aggregates(world):
    sent = world.send()
    for delta, n, site in ((1.0, 100, "bank-a"), (2.0, 300, "bank-b"), (4.0, 600, "bank-c")):
        world.answer(sent[site], delta=delta, n=n)
    outcome = world.collect(sent)
    assert outcome.complete and list(outcome.accepted) == list(SITES) and outcome.excluded == {}
    merged = fedavg(outcome.updates())
    expected = (1.0 * 100 + 2.0 * 300 + 4.0 * 600) / 1000
    assert np.allclose(merged[0], expected) and np.allclose(merged[1], expected)
    assert outcome.reply_ids == {o.reply.message_id for o in outcome.sites.values()}
    assert outcome.summary()["bank-b"] == {
        "status": "accepted",
        "reason": None,
        "rejection": None,
        "refusal": [],
        "n_samples": 300,
        "warnings": [],
    }
    assert world.collect(sent).summary() == outcome.summary()  # a polling trigger may collect again


def test_a_signed_refusal_excludes_the_site_with_its_reasons(world):
    sent = world.send()
    world.answer(sent["bank-a"])
    world.refuse(sent["bank-b"])
    world.answer(sent["bank-c"])
    outcome = world.collect(sent)
    assert outcome.sites["bank-b"].status is SiteStatus.REFUSED
    assert outcome.excluded == {"bank-b": "refused by the site: strategy_not_allowed (strategy): no"}
    assert [s for s, _, _ in outcome.updates()] == ["bank-a", "bank-c"]


def _tamper_payload(storage: MemoryStorage, bucket: str, key: str) -> None:
    doc = json.loads(storage.get_bytes(bucket, key))
    answer = json.loads(base64.b64decode(doc["payload"]))
    answer["n_samples"] = 10_000_000  # weight this update more than it deserves
    doc["payload"] = base64.b64encode(canonical_json(answer)).decode()
    storage.put_bytes(bucket, key, json.dumps(doc).encode())


def _resign_header(storage: MemoryStorage, bucket: str, key: str) -> None:
    doc = json.loads(storage.get_bytes(bucket, key))
    doc["signature"] = LocalSigner().sign(canonical_json(doc["header"]))
    storage.put_bytes(bucket, key, json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (_tamper_payload, "tampered_payload"),
        (_resign_header, "bad_signature"),
        (lambda s, b, k: s.put_bytes(b, k, b"not json"), "malformed"),
    ],
)
def test_a_tampered_or_forged_answer_is_rejected_and_excludes_only_its_site(world, tamper, code):
    sent = world.send()
    keys = {site: world.answer(sent[site]) for site in SITES}
    tamper(world.storage, "exchange-bank-b", keys["bank-b"])
    outcome = world.collect(sent)
    assert list(outcome.accepted) == ["bank-a", "bank-c"]
    bad = outcome.sites["bank-b"]
    assert bad.status is SiteStatus.REJECTED and bad.rejection is not None
    assert bad.rejection.reason_code == code and bad.rejection.object_key == keys["bank-b"]
    assert outcome.excluded["bank-b"].startswith(f"its reply was rejected ({code}, {keys['bank-b']}:")


def test_an_answer_signed_by_another_sites_key_is_rejected(world):
    sent = world.send()
    world.answer(sent["bank-a"], signer=world.sites["bank-b"])
    outcome = world.collect(sent)
    assert outcome.sites["bank-a"].rejection.reason_code == "bad_signature"


@pytest.mark.parametrize(
    ("case", "code", "match"),
    [
        ("swapped", "tampered_payload", "is not the one the signed answer names"),
        ("removed", "tampered_payload", "is not in the bucket"),
        ("outside", "moved", "is not an update blob of this round"),
        ("not-weights", "malformed", "is not usable"),
        ("no-update", "malformed", "carries no update"),
        ("no-samples", "malformed", "cannot be weighted"),
    ],
)
def test_an_update_blob_that_is_not_the_signed_one_is_rejected(world, case, code, match):
    sent = world.send()
    job = sent["bank-a"]
    if case in ("swapped", "removed"):
        key = world.answer(job)
        doc = json.loads(world.storage.get_bytes(job.bucket, key))
        ref = json.loads(base64.b64decode(doc["payload"]))["update"]
        if case == "swapped":
            world.storage.put_bytes(job.bucket, ref["key"], weights.dumps([np.ones(2, np.float32)]))
        else:
            world.storage.remove(job.bucket, ref["key"])
    elif case == "outside":
        weights_key = global_weights_key(RUN, 1, sha256_hex(GLOBAL))  # e.g. the global weights, unchanged
        world.answer(job, ref=BlobRef(key=weights_key, sha256=sha256_hex(GLOBAL), size=len(GLOBAL)))
    elif case == "not-weights":
        world.answer(job, update=b"pickle? no thanks")
    elif case == "no-update":
        world.answer(job, payload=canonical_json(dump(RoundAnswer(mode="train", n_samples=5))))
    else:
        world.answer(job, n=0)
    outcome = world.collect(sent, now=job.expires_at)
    site = outcome.sites["bank-a"]
    assert site.status is SiteStatus.REJECTED and site.rejection.reason_code == code
    assert match in site.rejection.message


def test_a_signed_payload_that_is_no_answer_is_rejected_as_malformed(world):
    sent = world.send()
    world.answer(sent["bank-a"], payload=b'{"schema_version": 1, "mode": "train", "n_samples": "many"}')
    rejection = world.collect(sent).sites["bank-a"].rejection
    assert rejection.reason_code == "malformed" and "invalid RoundAnswer" in rejection.message


def test_an_answer_to_an_earlier_job_is_unbound_and_a_seen_one_a_replay(world):
    first = world.send()
    stale = world.answer(first["bank-a"])
    again = world.send()  # the round re-sent: new jobs, new ids
    outcome = world.collect(again)
    assert outcome.sites["bank-a"].rejection.reason_code == "unbound_answer"

    world.answer(again["bank-a"])
    accepted = world.collect(again)
    assert accepted.sites["bank-a"].status is SiteStatus.ACCEPTED
    assert "a reply was rejected beside a valid one (unbound_answer" in accepted.sites["bank-a"].warnings[0]
    world.storage.remove("exchange-bank-a", stale)
    replay = world.collect(again, seen_ids=accepted.reply_ids)
    assert replay.sites["bank-a"].rejection.reason_code == "replay"


def test_junk_beside_a_valid_answer_does_not_exclude_the_site(world):
    sent = world.send()
    world.answer(sent["bank-a"])
    junk = f"{prefix_for(MessageKind.ANSWER, RUN, 1)}{uuid.uuid4()}.json"
    world.storage.put_bytes("exchange-bank-a", junk, b"{}")
    world.storage.put_bytes("exchange-bank-a", f"{prefix_for(MessageKind.ANSWER, RUN, 1)}notes.txt", b"x")
    site = world.collect(sent).sites["bank-a"]
    assert site.status is SiteStatus.ACCEPTED
    assert any("malformed" in w for w in site.warnings) and any("notes.txt" in w for w in site.warnings)


def test_a_refusal_stands_over_an_answer_and_the_earliest_of_two_answers_is_used(world):
    sent = world.send()
    world.answer(sent["bank-a"])
    world.refuse(sent["bank-a"])
    late = world.answer(sent["bank-b"], delta=9.0, created=NOW + timedelta(minutes=3))
    early = world.answer(sent["bank-b"], delta=1.0, created=NOW + timedelta(minutes=2))
    outcome = world.collect(sent)
    assert outcome.sites["bank-a"].status is SiteStatus.REFUSED
    assert "its refusal stands" in outcome.sites["bank-a"].warnings[-1]
    b = outcome.sites["bank-b"]
    assert b.status is SiteStatus.ACCEPTED and object_key(b.reply) == early != late
    assert np.allclose(weights.loads(b.update)[0][0], 1.0) and "2 valid answers" in b.warnings[0]


def test_silence_is_pending_until_the_job_expires_then_missing_with_what_happened_to_the_job(world):
    sent = world.send()
    world.answer(sent["bank-a"])
    assert world.collect(sent).pending == ["bank-b", "bank-c"]
    assert not world.collect(sent).complete

    job_b, job_c = sent["bank-b"], sent["bank-c"]
    world.storage.remove(job_b.bucket, object_key(job_b))  # withheld
    payload = canonical_json(dump(round_job(strategy="krum")))  # replaced by someone without the key
    forged = make_header(
        MessageKind.JOB,
        consortium=CONSORTIUM,
        run_id=RUN,
        round=1,
        site="bank-c",
        bucket=job_c.bucket,
        payload=payload,
        payload_schema=RoundJob.payload_schema,
        ttl=timedelta(hours=24),
        now=NOW,
        message_id=job_c.message_id,
    )
    world.storage.put_bytes(job_c.bucket, object_key(job_c), seal(forged, payload, LocalSigner()))
    outcome = world.collect(sent, now=job_b.expires_at)
    assert outcome.complete and list(outcome.accepted) == ["bank-a"]
    assert outcome.sites["bank-b"].status is SiteStatus.MISSING
    assert outcome.excluded["bank-b"] == (
        f"no answer or refusal before the job expired at {job_b.expires_at.isoformat()}; "
        f"the job sent ({object_key(job_b)}) is no longer in exchange-bank-b: removed after it was sent"
    )
    assert "was replaced in exchange-bank-c after it was sent" in outcome.excluded["bank-c"]


def test_silence_with_the_job_intact_says_only_that_it_expired(world):
    sent = world.send()
    job = sent["bank-a"]
    outcome = world.collect({"bank-a": job}, now=job.expires_at)
    assert outcome.excluded == {
        "bank-a": f"no answer or refusal before the job expired at {job.expires_at.isoformat()}"
    }


def test_a_site_removed_or_unreadable_is_excluded_not_raised(world):
    sent = world.send()
    world.answer(sent["bank-c"])
    world.registry.delete("bank-a")
    world.storage.remove_bucket("exchange-bank-b")
    outcome = world.collect(sent)
    assert outcome.sites["bank-a"].rejection.reason_code == "not_enrolled"
    assert outcome.sites["bank-b"].rejection.reason_code == "unreadable"
    assert list(outcome.accepted) == ["bank-c"]


def test_collect_checks_its_own_arguments(world):
    sent = world.send()
    with pytest.raises(ValueError, match="nothing to collect"):
        world.collect({})
    other = world.send(round=2)
    with pytest.raises(ValueError, match="several runs/rounds"):
        world.collect({"bank-a": sent["bank-a"], "bank-b": other["bank-b"]})
    with pytest.raises(ValueError, match="wrong site"):
        world.collect({"bank-a": sent["bank-b"]})


def test_a_job_resigned_by_another_key_is_told_apart_with_the_coordinators_key(world):
    sent = world.send()
    job = sent["bank-a"]
    doc = json.loads(world.storage.get_bytes(job.bucket, object_key(job)))
    doc["signature"] = LocalSigner().sign(canonical_json(doc["header"]))
    world.storage.put_bytes(job.bucket, object_key(job), json.dumps(doc).encode())
    blind = world.collect({"bank-a": job}, now=job.expires_at)
    assert "replaced" not in blind.excluded["bank-a"]  # header and payload are the ones sent
    seeing = world.collect(
        {"bank-a": job}, now=job.expires_at, coordinator_key=world.coordinator.public_key()
    )
    assert "was replaced in exchange-bank-a after it was sent" in seeing.excluded["bank-a"]
