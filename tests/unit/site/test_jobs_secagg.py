"""A site's round jobs under secure aggregation (``site.jobs`` with ``secagg``): the update stays at the
site until it is masked, and the coordinator's phase jobs are dispatched to the site's phases with the
site's own check of the setup. A local Ed25519 key stands in for each Vault signer, a dict for the exchange
bucket and an AES-GCM box with a local key for the site's Vault key (tests/unit/site/fakes.py);
tests/integration/test_secure_federated_dag.py runs the whole protocol with OpenBao and SeaweedFS.
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

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lepton_tasks.core import weights
from lepton_tasks.core.exchange import (
    JobHeader,
    JobRef,
    MessageKind,
    make_header,
    object_key,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import BlobRef, RoundAnswer, RoundJob, dump
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.secagg_messages import SecAggSetup, UpdateLayout, seal_job
from lepton_tasks.federation.exchange import global_weights_key
from lepton_tasks.site.jobs import JobOutcome, JobStatus, handle_job
from lepton_tasks.site.secagg import SiteExchange, held_input
from lepton_tasks.site.state import SiteState
from tests.unit.site.fakes import CONSORTIUM, RUN, LocalSigner, MemoryStorage, round_job, site_policy

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SITE, BUCKET = "bank-a", "exchange-bank-a"
UPDATE = [np.full((3, 2), 0.5, np.float32), np.arange(2, dtype=np.float32)]
GLOBAL = weights.dumps([np.zeros((3, 2), np.float32), np.zeros(2, np.float32)], {})


class AesBox:
    """A test stand-in for ``VaultSecretBox``: AES-256-GCM under a local key (nonce || ciphertext)."""

    def __init__(self) -> None:
        self.aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        return self.aead.decrypt(ciphertext[:12], ciphertext[12:], associated_data)


@dataclass
class World:
    coordinator: LocalSigner
    site_signer: LocalSigner
    storage: MemoryStorage
    state: SiteState
    log: OutboundLog
    policy: Any
    ctx: SiteExchange
    trained: list[RoundJob]

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        self.trained.append(job)
        return RoundAnswer(mode="train", n_samples=120, metrics={"loss": 0.25}), weights.dumps(UPDATE, {})

    def post(self, job: RoundJob) -> JobHeader:
        self.storage.ensure_bucket(BUCKET)
        digest = sha256_hex(GLOBAL)
        ref = BlobRef(key=global_weights_key(RUN, 1, digest), sha256=digest, size=len(GLOBAL))
        self.storage.put_bytes(BUCKET, ref.key, GLOBAL)
        payload = json.dumps(dump(job.model_copy(update={"global_weights": ref}))).encode()
        header = make_header(
            MessageKind.JOB,
            consortium=CONSORTIUM,
            run_id=RUN,
            round=1,
            site=SITE,
            bucket=BUCKET,
            payload=payload,
            payload_schema=RoundJob.payload_schema,
            ttl=timedelta(hours=24),
            now=NOW,
        )
        assert isinstance(header, JobHeader)
        self.storage.put_bytes(BUCKET, object_key(header), seal(header, payload, self.coordinator))
        return header

    def post_setup(self, for_job: JobRef | None, **over: Any) -> JobHeader:
        fields: dict[str, Any] = {
            "consortium": CONSORTIUM,
            "run_id": RUN,
            "round": 1,
            "site": SITE,
            "aggregation_id": uuid.uuid4(),
            "purpose": "update",
            "for_job": for_job,
            "sites": sorted([SITE, "bank-b", "bank-c"]),
            "threshold": 2,
            "bits": 64,
            "update": UpdateLayout(shapes=[[3, 2], [2]], clip=64.0, max_samples=10_000),
            **over,
        }
        header, raw = seal_job(
            SecAggSetup(**fields), bucket=BUCKET, signer=self.coordinator, ttl=timedelta(hours=1), now=NOW
        )
        self.storage.put_bytes(BUCKET, object_key(header), raw)
        return header

    def handle(self, header: JobHeader, **kw: Any) -> JobOutcome:
        key = object_key(header)
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
            "secagg": self.ctx,
        }
        args.update(kw)
        return handle_job(self.storage.get_bytes(BUCKET, key), **args)


@pytest.fixture
def world(tmp_path: Path) -> World:
    coordinator = LocalSigner("coordinator")
    site_signer = LocalSigner("site")
    storage = MemoryStorage()
    log = OutboundLog(tmp_path / "site" / "outbound.jsonl")
    policy = site_policy(coordinator, SITE, min_partners=3)
    return World(
        coordinator=coordinator,
        site_signer=site_signer,
        storage=storage,
        state=SiteState(tmp_path / "site" / "state.json"),
        log=log,
        policy=policy,
        ctx=SiteExchange.from_policy(
            policy,
            storage=storage,
            bucket=BUCKET,
            signer=site_signer,
            outbound_log=log,
            box=AesBox(),
            state_dir=tmp_path / "site",
        ),
        trained=[],
    )


def _payload(storage: MemoryStorage, key: str) -> dict[str, Any]:
    doc = json.loads(storage.get_bytes(BUCKET, key))
    payload: dict[str, Any] = json.loads(base64.b64decode(doc["payload"]))
    return payload


def test_a_secure_train_job_is_answered_without_its_update_which_stays_at_the_site_encrypted(world):
    job = world.post(round_job(secure_aggregation=True, min_partners=3))
    outcome = world.handle(job)
    assert outcome.status is JobStatus.ANSWERED and world.trained
    assert not [k for k in world.storage.puts(BUCKET) if k.endswith(".update")]
    answer_key = next(k for k in outcome.written if k.endswith(".json"))
    payload = _payload(world.storage, answer_key)
    assert payload["update"] is None and payload["n_samples"] is None  # the count crosses masked only
    held = held_input(world.ctx, run_id=RUN, round=1)
    assert held is not None and held.purpose == "update" and held.job_message_id == job.message_id
    assert held.n_samples == 120  # what the masked input weights with
    arrays, _ = weights.loads(held.data)
    for got, want in zip(arrays, UPDATE, strict=True):
        np.testing.assert_array_equal(got, want)
    # encrypted at rest: the file holds no byte run of the update, and its mode is 0600
    path = next((world.ctx.root / RUN).glob("*.held"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert UPDATE[0].tobytes() not in path.read_bytes()


def test_a_secure_train_answer_carries_no_count_in_its_metrics_or_held_out_block(world):
    """A trainer's training metrics hold the row count (``n``, ``positives``) and the incoming model's
    held-out block a histogram of the held-out rows: under secure aggregation none of it crosses."""
    n = 4321

    def trainer(job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        world.trained.append(job)
        metrics = {"loss": 0.25, "auc": 0.7, "n": n, "positives": 1234, "train_seconds": 2.5}
        held_out = {"auc": 0.7, "n": 999, "score_summary": {"n": 999}}
        answer = RoundAnswer(mode="train", n_samples=n, metrics=metrics, evaluation=held_out)
        return answer, weights.dumps(UPDATE, {})

    outcome = world.handle(
        world.post(round_job(secure_aggregation=True, min_partners=3)), run_trainer=trainer
    )
    payload = _payload(world.storage, next(k for k in outcome.written if k.endswith(".json")))
    assert payload["n_samples"] is None and payload["evaluation"] is None
    assert payload["metrics"] == {"loss": 0.25, "auc": 0.7}
    assert str(n) not in json.dumps(payload) and "1234" not in json.dumps(payload)


def test_a_secure_job_is_refused_before_training_by_a_site_not_set_up_for_it(world):
    job = world.post(round_job(secure_aggregation=True, min_partners=3))
    outcome = world.handle(job, secagg=None)
    assert outcome.status is JobStatus.REFUSED and not world.trained
    assert [r["code"] for r in outcome.reasons] == ["secure_aggregation_unavailable"]


def test_the_setup_of_the_job_answered_is_joined_and_one_bound_to_another_job_refused(world):
    job = world.post(round_job(secure_aggregation=True, min_partners=3))
    assert world.handle(job).status is JobStatus.ANSWERED

    other = world.post_setup(JobRef(message_id=uuid.uuid4(), payload_sha256=job.payload_sha256))
    refused = world.handle(other)
    assert refused.status is JobStatus.REFUSED and refused.secagg is not None
    assert [r["code"] for r in refused.reasons] == ["secagg_invalid_setup"]
    assert "not to the job" in refused.reasons[0]["message"]


def test_a_setup_whose_layout_the_held_update_does_not_fit_is_refused(world):
    job = world.post(round_job(secure_aggregation=True, min_partners=3))
    world.handle(job)
    ref = JobRef(message_id=job.message_id, payload_sha256=job.payload_sha256)
    wrong = world.post_setup(ref, update=UpdateLayout(shapes=[[6], [2]], clip=64.0, max_samples=10_000))
    refused = world.handle(wrong)
    assert refused.status is JobStatus.REFUSED
    assert any(r["field"] == "update.shapes" for r in refused.reasons)


def test_the_setup_bound_to_the_job_answered_is_joined_with_fresh_public_keys(world):
    job = world.post(round_job(secure_aggregation=True, min_partners=3))
    world.handle(job)
    setup = world.post_setup(JobRef(message_id=job.message_id, payload_sha256=job.payload_sha256))
    joined = world.handle(setup)
    assert joined.status is JobStatus.ANSWERED and joined.secagg is not None
    (answer_key,) = [k for k in joined.written if k.endswith(".json")]
    doc = json.loads(world.storage.get_bytes(BUCKET, answer_key))
    assert doc["header"]["payload_schema"] == "lepton-secagg-keys/1"
    assert world.state.read().handled[object_key(setup)] == "secagg:keys:answered"


def test_a_phase_job_is_rejected_by_a_site_without_secure_aggregation(world):
    job = world.post(round_job(min_partners=3))
    assert world.handle(job, secagg=None).status is JobStatus.ANSWERED
    setup = world.post_setup(JobRef(message_id=job.message_id, payload_sha256=job.payload_sha256))
    outcome = world.handle(setup, secagg=None)
    assert outcome.status is JobStatus.REJECTED and outcome.rejection is not None
    assert outcome.rejection["reason_code"] == "wrong_payload_schema"
