"""The site's job handling: authenticate, decide by policy, answer or refuse (signed), log before every put.

A local Ed25519 key stands in for each Vault signer and a dict for the exchange bucket (tests/unit/site/
fakes.py); tests/integration/test_exchange_round.py runs the same code against SeaweedFS and OpenBao.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lepton_tasks.core.exchange import (
    AnswerHeader,
    Expectation,
    JobHeader,
    MessageKind,
    RefusalHeader,
    make_header,
    object_key,
    open_message,
    prefix_for,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import BlobRef, RoundAnswer, RoundJob, RoundRefusal, dump, load
from lepton_tasks.core.outbound_log import ListedObject, OutboundLog, reconcile
from lepton_tasks.federation.exchange import global_weights_key
from lepton_tasks.site.jobs import CannotAnswer, JobOutcome, JobStatus, handle_job, poll_jobs, run_pending
from lepton_tasks.site.state import SiteState, SiteStateError
from tests.unit.site.fakes import CONSORTIUM, RUN, LocalSigner, MemoryStorage, round_job, site_policy

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SITE, BUCKET = "bank-a", "exchange-bank-a"
GLOBAL = b"global weights of round 1"
UPDATE = b"bank-a's update"


@dataclass
class World:
    coordinator: LocalSigner
    site_signer: LocalSigner
    storage: MemoryStorage
    state: SiteState
    log: OutboundLog
    policy: Any
    trained: list[tuple[RoundJob, bytes | None]]

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        self.trained.append((job, global_weights))
        return RoundAnswer(mode="train", n_samples=1200, metrics={"loss": 0.25}), UPDATE

    def post(
        self,
        job: RoundJob | bytes | None = None,
        *,
        round: int = 1,
        blob: bytes | None = GLOBAL,
        site: str = SITE,
        bucket: str = BUCKET,
        signer: LocalSigner | None = None,
        created: datetime = NOW,
        ttl: timedelta = timedelta(hours=24),
    ) -> JobHeader:
        """Write a job (and its global weights) into ``bucket`` as the coordinator would."""
        self.storage.ensure_bucket(bucket)
        if isinstance(job, bytes):
            payload = job
        else:
            job = job or round_job()
            if blob is not None:
                digest = sha256_hex(blob)
                ref = BlobRef(key=global_weights_key(RUN, round, digest), sha256=digest, size=len(blob))
                self.storage.put_bytes(bucket, ref.key, blob)
                job = job.model_copy(update={"global_weights": ref})
            payload = json.dumps(dump(job)).encode()
        header = make_header(
            MessageKind.JOB,
            consortium=CONSORTIUM,
            run_id=RUN,
            round=round,
            site=site,
            bucket=bucket,
            payload=payload,
            payload_schema=RoundJob.payload_schema,
            ttl=ttl,
            now=created,
        )
        assert isinstance(header, JobHeader)
        self.storage.put_bytes(bucket, object_key(header), seal(header, payload, signer or self.coordinator))
        return header

    def handle(self, header_or_key: JobHeader | str, raw: bytes | None = None, **kw: Any) -> JobOutcome:
        key = header_or_key if isinstance(header_or_key, str) else object_key(header_or_key)
        args: dict[str, Any] = {
            "key": key,
            "policy": self.policy,
            "state": self.state,
            "run_trainer": self.trainer,
            "signer": self.site_signer,
            "storage": self.storage,
            "bucket": BUCKET,
            "outbound_log": self.log,
            "now": NOW + timedelta(minutes=1),
        }
        args.update(kw)
        return handle_job(raw or self.storage.get_bytes(BUCKET, key), **args)

    def open_reply(self, job: JobHeader, key: str) -> tuple[AnswerHeader | RefusalHeader, bytes]:
        """Open a reply as the coordinator does."""
        header, payload = open_message(
            self.storage.get_bytes(BUCKET, key),
            expected=Expectation.for_reply(job, object_key=key),
            public_key=self.site_signer.public_key_b64,
            seen_ids=set(),
            now=NOW + timedelta(hours=3),
        )
        assert isinstance(header, AnswerHeader | RefusalHeader)
        return header, payload

    def site_writes(self) -> list[str]:
        return [k for k in self.storage.puts(BUCKET) if not k.startswith("jobs/")]


@pytest.fixture
def world(tmp_path: Path) -> World:
    coordinator = LocalSigner("coordinator")
    return World(
        coordinator=coordinator,
        site_signer=LocalSigner("site"),
        storage=MemoryStorage(),
        state=SiteState(tmp_path / "site" / "state.json"),
        log=OutboundLog(tmp_path / "site" / "outbound.jsonl"),
        policy=site_policy(coordinator, SITE),
        trained=[],
    )


def _reasons(world: World, outcome: JobOutcome) -> list[str]:
    assert outcome.status is JobStatus.REFUSED and outcome.reply is not None and outcome.header is not None
    header, payload = world.open_reply(outcome.header, object_key(outcome.reply))
    assert isinstance(header, RefusalHeader)
    refusal = load(RoundRefusal, payload, where="test")
    assert [r["code"] for r in refusal.reasons] == [r["code"] for r in outcome.reasons]
    return [r["code"] for r in refusal.reasons]


# ------------------------------------------------------------------------------------------------ answer


def test_an_allowed_job_is_trained_and_answered_with_a_signed_answer_and_its_update(world):
    job = world.post()
    outcome = world.handle(job)
    assert outcome.status is JobStatus.ANSWERED and outcome.header == job
    [(trained_job, global_weights)] = world.trained
    assert global_weights == GLOBAL and trained_job.dataset == "banks"

    blob_key, answer_key = outcome.written
    assert outcome.reply is not None and answer_key == object_key(outcome.reply)
    assert blob_key == f"{prefix_for(MessageKind.ANSWER, RUN, 1)}{outcome.reply.message_id}.update"
    _, payload = world.open_reply(job, answer_key)  # the coordinator can verify it with the pinned key
    answer = load(RoundAnswer, payload, where="test")
    assert answer.n_samples == 1200 and answer.update == BlobRef(
        key=blob_key, sha256=sha256_hex(UPDATE), size=len(UPDATE)
    )
    assert world.storage.get_bytes(BUCKET, blob_key) == UPDATE

    doc = world.state.read()
    assert doc.handled == {object_key(job): "answered"} and job.message_id in doc.seen_ids
    assert doc.rounds == {RUN: 1}
    assert (world.state.path.stat().st_mode & 0o777) == 0o600


def test_every_put_is_in_the_outbound_log_before_it_happens_and_the_log_reconciles(world):
    class CheckingStorage(MemoryStorage):
        def put_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> str:
            if not key.startswith("jobs/"):  # the coordinator's writes are not the site's
                logged = {(r.object_key, r.sha256, r.size) for r in world.log.records()}
                assert (key, sha256_hex(data), len(data)) in logged, f"{key} was put before it was logged"
            return super().put_bytes(bucket, key, data, **kw)

    world.storage = CheckingStorage()
    world.handle(world.post())
    world.policy = site_policy(world.coordinator, SITE, allowed_strategies=frozenset({"median"}))
    world.handle(world.post(round=2))  # a refusal is logged the same way
    assert len(world.site_writes()) == 3
    listing = [ListedObject(k, len(v), sha256_hex(v)) for k, v in world.storage.buckets[BUCKET].items()]
    diff = reconcile(world.log.records(), listing, bucket=BUCKET)
    assert diff.ok, diff.summary()
    assert {r.kind for r in world.log.records()} == {MessageKind.ANSWER, MessageKind.REFUSAL}


def test_a_job_without_global_weights_trains_from_scratch(world):
    outcome = world.handle(world.post(blob=None))
    assert outcome.status is JobStatus.ANSWERED and world.trained[0][1] is None


# ---------------------------------------------------------------------------------------------- rejected


def test_a_job_signed_by_another_key_is_rejected_and_nothing_is_sent(world):
    forged = world.post(signer=LocalSigner("forger"))
    outcome = world.handle(forged)
    assert outcome.status is JobStatus.REJECTED and outcome.header is None
    assert outcome.rejection is not None and outcome.rejection["reason_code"] == "bad_signature"
    assert world.site_writes() == [] and world.trained == [] and world.log.records() == []
    assert world.state.read().handled == {object_key(forged): "rejected:bad_signature"}
    assert poll_jobs(world.storage, BUCKET, last_seen=world.state.read().handled) == []  # not fetched again


def test_a_tampered_job_payload_is_rejected(world):
    job = world.post()
    doc = json.loads(world.storage.get_bytes(BUCKET, object_key(job)))
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["strategy"] = "krum"
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    world.storage.put_bytes(BUCKET, object_key(job), json.dumps(doc).encode())
    outcome = world.handle(job)
    assert outcome.status is JobStatus.REJECTED and outcome.rejection is not None
    assert outcome.rejection["reason_code"] == "tampered_payload" and world.site_writes() == []


def test_a_job_for_another_site_copied_into_this_bucket_is_rejected_as_moved(world):
    other = world.post(site="bank-b", bucket="exchange-bank-b")
    key = object_key(other)
    world.storage.ensure_bucket(BUCKET)
    world.storage.put_bytes(BUCKET, key, world.storage.get_bytes("exchange-bank-b", key))
    outcome = world.handle(key)
    assert outcome.status is JobStatus.REJECTED and outcome.rejection is not None
    assert outcome.rejection["reason_code"] == "moved" and outcome.rejection["field"] == "header.site"
    assert world.site_writes() == []


def test_a_job_copied_to_another_key_is_rejected_as_moved(world):
    job = world.post()
    moved = f"jobs/{RUN}/0002/{uuid.uuid4()}.json"
    world.storage.put_bytes(BUCKET, moved, world.storage.get_bytes(BUCKET, object_key(job)))
    outcome = world.handle(moved)
    assert outcome.rejection is not None and outcome.rejection["reason_code"] == "moved"
    assert outcome.rejection["field"] == "object_key"


def test_the_same_job_delivered_again_is_a_replay_and_its_first_outcome_stands(world):
    job = world.post()
    assert world.handle(job).status is JobStatus.ANSWERED
    again = world.handle(job)
    assert again.status is JobStatus.REJECTED and again.rejection is not None
    assert again.rejection["reason_code"] == "replay" and again.rejection["field"] == "header.message_id"
    assert len(world.site_writes()) == 2 and len(world.trained) == 1
    assert world.state.read().handled == {object_key(job): "answered"}


def test_a_job_of_a_round_already_past_is_a_replay(world):
    withheld = world.post(round=2)  # e.g. held back by someone between the coordinator and the site
    assert world.handle(world.post(round=3)).status is JobStatus.ANSWERED
    outcome = world.handle(withheld)
    assert outcome.rejection is not None and outcome.rejection["reason_code"] == "replay"
    assert outcome.rejection["field"] == "header.round" and "before round 3" in outcome.rejection["message"]
    # a second job of the CURRENT round (a coordinator that re-sent it) is still accepted
    assert world.handle(world.post(round=3)).status is JobStatus.ANSWERED


def test_an_expired_job_is_rejected_and_one_from_the_future_is_retried_later(world):
    expired = world.post(ttl=timedelta(seconds=30))
    outcome = world.handle(expired)
    assert outcome.rejection is not None and outcome.rejection["reason_code"] == "expired"
    early = world.post(created=NOW + timedelta(hours=1))
    outcome = world.handle(early)
    assert outcome.rejection is not None and outcome.rejection["reason_code"] == "not_yet_valid"
    assert object_key(early) not in world.state.read().handled  # polled again: the clock may catch up
    assert world.handle(early, now=NOW + timedelta(hours=1)).status is JobStatus.ANSWERED


# --------------------------------------------------------------------------------------------- refusals


def test_the_sites_policy_refuses_with_every_reason_in_one_signed_refusal(world):
    world.policy = site_policy(
        world.coordinator, SITE, allowed_strategies=frozenset({"fedavg"}), max_rounds=3
    )
    outcome = world.handle(world.post(round_job(strategy="krum", rounds=8, dataset="hospitals")))
    assert _reasons(world, outcome) == ["dataset_not_allowed", "too_many_rounds", "strategy_not_allowed"]
    assert world.trained == [] and len(world.site_writes()) == 1
    assert world.state.read().handled == {object_key(outcome.header): "refused"}


def test_a_contract_that_does_not_hash_to_its_declared_sha256_is_refused(world):
    job = round_job()
    altered = {**job.contract, "name": "banks-altered"}
    outcome = world.handle(world.post(job.model_copy(update={"contract": altered})))
    assert _reasons(world, outcome) == ["contract_inconsistent", "contract_mismatch"]


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (lambda s, key: s.put_bytes(BUCKET, key, b"global weights of round 1, edited"), "weights_tampered"),
        (lambda s, key: s.remove(BUCKET, key), "weights_missing"),
    ],
)
def test_tampered_or_missing_global_weights_are_refused_and_never_trained_on(world, tamper, code):
    job = world.post()
    tamper(world.storage, global_weights_key(RUN, 1, sha256_hex(GLOBAL)))
    outcome = world.handle(job)
    assert _reasons(world, outcome) == [code] and world.trained == []


def test_global_weights_outside_the_jobs_folder_are_refused(world):
    world.storage.ensure_bucket(BUCKET)
    world.storage.put_bytes(BUCKET, "answers/elsewhere.update", GLOBAL)
    job = round_job(global_weights=BlobRef(key="answers/elsewhere.update", sha256=sha256_hex(GLOBAL), size=7))
    outcome = world.handle(world.post(job, blob=None))
    assert _reasons(world, outcome) == ["weights_tampered"]
    assert "not in this job's folder" in outcome.reasons[0]["message"]


def test_a_signed_payload_that_is_no_round_job_is_refused(world):
    outcome = world.handle(world.post(b'{"schema_version": 1, "mode": "train"}'))
    assert _reasons(world, outcome) == ["invalid_job"]
    assert "invalid RoundJob" in outcome.reasons[0]["message"]


# --------------------------------------------------------------------------------------------- approval


def test_approval_required_waits_then_refuses_after_the_deadline(world):
    world.policy = site_policy(world.coordinator, SITE, approval_required=True)
    job = world.post()
    first = world.handle(job, now=NOW + timedelta(minutes=1))
    assert first.status is JobStatus.WAITING and world.site_writes() == []
    assert first.approval_deadline == NOW + timedelta(minutes=1, hours=2)
    later = world.handle(job, now=NOW + timedelta(hours=1))  # the deadline counts from the first sight
    assert later.status is JobStatus.WAITING and later.approval_deadline == first.approval_deadline
    assert object_key(job) not in world.state.read().handled
    assert poll_jobs(world.storage, BUCKET, last_seen=world.state.read().handled) == [object_key(job)]
    timed_out = world.handle(job, now=NOW + timedelta(hours=2, minutes=1))
    assert _reasons(world, timed_out) == ["approval_timeout"] and world.trained == []


def test_an_approved_job_is_trained_and_a_denied_one_refused(world):
    world.policy = site_policy(world.coordinator, SITE, approval_required=True)
    assert world.handle(world.post(round=1), approved=True).status is JobStatus.ANSWERED
    denied = world.handle(world.post(round=2), approved=False)
    assert _reasons(world, denied) == ["approval_denied"] and len(world.trained) == 1


def test_a_failing_trainer_propagates_and_leaves_no_trace(world):
    def broken(job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        raise RuntimeError("out of memory")

    job = world.post()
    with pytest.raises(RuntimeError, match="out of memory"):
        world.handle(job, run_trainer=broken)
    assert world.site_writes() == [] and world.log.records() == []
    assert world.state.read().handled == {}  # retried by the task, not refused
    assert world.handle(job).status is JobStatus.ANSWERED


@pytest.mark.parametrize(
    ("code", "field", "message"),
    [
        ("trainer_failed", "trainer", "the trainer exited with code 3 (security failure)"),
        (
            "no_usable_data",
            "dataset",
            "bank-a has no verified, committed banks drop under the job's contract",
        ),
    ],
)
def test_a_trainer_that_cannot_answer_sends_a_signed_refusal_the_coordinator_verifies(
    world, code, field, message
):
    def cannot(job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        raise CannotAnswer(code, message, field=field)

    job = world.post()
    outcome = world.handle(job, run_trainer=cannot)
    assert outcome.status is JobStatus.REFUSED
    [key] = outcome.written
    header, payload = world.open_reply(job, key)  # verified with the site's key, bound to the job
    assert isinstance(header, RefusalHeader) and key.startswith("refusals/")
    assert load(RoundRefusal, payload, where="test").reasons == [
        {"code": code, "field": field, "message": message}
    ]
    assert [r.object_key for r in world.log.records()] == [key]  # in the outbound log
    assert world.state.read().handled == {object_key(job): "refused"}  # not fetched again


def test_a_trainer_answering_another_mode_is_a_bug_not_an_answer(world):
    def wrong(job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        return RoundAnswer(mode="evaluate", n_samples=3), None

    with pytest.raises(ValueError, match="evaluate"):
        world.handle(world.post(), run_trainer=wrong)
    assert world.site_writes() == []


# ------------------------------------------------------------------------------------------------ polling


def test_poll_lists_new_job_messages_newest_round_first_and_skips_blobs(world):
    r1, r3, r2 = world.post(round=1), world.post(round=3), world.post(round=2)
    world.storage.put_bytes(BUCKET, "jobs/not-a-message.txt", b"x")
    keys = poll_jobs(world.storage, BUCKET)
    assert keys == [object_key(r3), object_key(r2), object_key(r1)]
    assert poll_jobs(world.storage, BUCKET, last_seen={object_key(r3)}) == [object_key(r2), object_key(r1)]


def test_run_pending_handles_each_new_job_once(world):
    old, new = world.post(round=1), world.post(round=2)
    outcomes = run_pending(
        world.storage,
        BUCKET,
        policy=world.policy,
        state=world.state,
        run_trainer=world.trainer,
        signer=world.site_signer,
        outbound_log=world.log,
        now=NOW + timedelta(minutes=1),
    )
    # the newest round is trained; the older one is then stale
    assert [(o.key, o.status) for o in outcomes] == [
        (object_key(new), JobStatus.ANSWERED),
        (object_key(old), JobStatus.REJECTED),
    ]
    again = run_pending(
        world.storage,
        BUCKET,
        policy=world.policy,
        state=world.state,
        run_trainer=world.trainer,
        signer=world.site_signer,
        outbound_log=world.log,
    )
    assert again == []


def test_run_pending_passes_approvals_by_key(world):
    world.policy = site_policy(world.coordinator, SITE, approval_required=True)
    job = world.post()
    kwargs: dict[str, Any] = {
        "policy": world.policy,
        "state": world.state,
        "run_trainer": world.trainer,
        "signer": world.site_signer,
        "outbound_log": world.log,
        "now": NOW + timedelta(minutes=1),
    }
    assert [o.status for o in run_pending(world.storage, BUCKET, **kwargs)] == [JobStatus.WAITING]
    approved = run_pending(world.storage, BUCKET, approvals={object_key(job): True}, **kwargs)
    assert [o.status for o in approved] == [JobStatus.ANSWERED]


# ---------------------------------------------------------------------------------------------- state


def test_the_state_file_must_stay_private(world):
    world.handle(world.post())
    os.chmod(world.state.path, 0o644)
    with pytest.raises(SiteStateError, match="mode 600"):
        world.state.read()
    with pytest.raises(SiteStateError, match="mode 600"):
        world.handle(world.post(round=2))


def test_a_corrupt_state_file_is_an_error_not_a_fresh_start(world):
    world.handle(world.post())
    world.state.path.write_text('{"schema_version": 1, "seen_ids": "nope"}')
    with pytest.raises(SiteStateError, match="seen_ids"):
        world.state.read()
