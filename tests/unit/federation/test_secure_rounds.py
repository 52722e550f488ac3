"""The coordinator under secure aggregation, without the protocol run: what ``start_run`` refuses before a
run starts, and how ``collect_answers`` judges a secure round's folder (answers without their update, the
phases' replies beside them). Local Ed25519 keys and a dict stand in for Vault and S3
(tests/unit/site/fakes.py); tests/integration/test_secure_federated_dag.py runs the protocol end to end.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import weights
from lepton_tasks.core.exchange import (
    JobHeader,
    MessageKind,
    canonical_json,
    job_ref,
    make_header,
    object_key,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import BlobRef, RoundAnswer, TrainerHParams, dump
from lepton_tasks.core.secagg_messages import (
    SecAggKeys,
    SecAggSetup,
    UpdateLayout,
    seal_answer,
    seal_job,
    seal_refusal,
)
from lepton_tasks.federation.coordinator import RunSetupError, start_run
from lepton_tasks.federation.enrollment import SiteEntry, SiteRegistry, pin_site_key
from lepton_tasks.federation.exchange import ALL_SITES, SiteStatus, collect_answers, send_round, update_key
from tests.unit.site.fakes import CONSORTIUM, RUN, LocalSigner, MemoryStorage, round_job

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SITES = ("bank-a", "bank-b", "bank-c")
BUCKET = "models"
GLOBAL = weights.dumps([np.zeros((2, 2), np.float32), np.zeros(2, np.float32)], {"round": 0})
HP = TrainerHParams(
    local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.01, seed=7, fedprox_mu=0
)


class Buckets(MemoryStorage):
    def put_json(self, bucket: str, key: str, obj: Any) -> str:
        return self.put_bytes(bucket, key, json.dumps(obj).encode())

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Buckets, SiteRegistry, LocalSigner, dict[str, LocalSigner]]:
    storage, registry = Buckets(), SiteRegistry(tmp_path / "sites.yaml")
    storage.ensure_bucket(BUCKET)
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
    return storage, registry, LocalSigner("coordinator"), sites


def _start(world: Any, **kw: Any) -> Any:
    storage, registry, _, _ = world
    args: dict[str, Any] = {
        "airflow_run_id": f"manual__{uuid.uuid4()}",
        "consortium": CONSORTIUM,
        "dataset": "banks",
        "sites": None,
        "rounds": 2,
        "strategy": "fedavg",
        "min_partners": 2,
        "round_deadline_minutes": 30,
        "hparams": HP,
        "secure_aggregation": True,
        "now": NOW,
        **kw,
    }
    return start_run(storage, BUCKET, registry, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum"])
def test_a_strategy_that_needs_individual_updates_is_refused_before_the_run_starts(world, strategy):
    with pytest.raises(RunSetupError) as err:
        _start(world, strategy=strategy)
    assert str(err.value) == (
        f"strategy {strategy!r} needs every site's individual update, but under secure aggregation the "
        "coordinator learns only their sum: choose fedavg or fedprox, or run without secure aggregation"
    )
    assert world[0].puts() == []  # nothing written: no spec, no job


def test_secure_aggregation_needs_three_sites_and_fedavg_or_fedprox_runs(world):
    with pytest.raises(
        RunSetupError, match=r"secure aggregation needs at least 3 sites .* has 2: bank-a, bank-b"
    ):
        _start(world, sites=["bank-a", "bank-b"])
    assert world[0].puts() == []
    for strategy in ("fedavg", "fedprox"):
        assert _start(world, strategy=strategy).secure_aggregation
    assert not _start(world, strategy="median", secure_aggregation=False).secure_aggregation


def _send(world: Any) -> dict[str, JobHeader]:
    storage, registry, coordinator, _ = world
    jobs = {s: round_job(secure_aggregation=True) for s in SITES}
    return send_round(
        storage,
        coordinator,
        registry,
        consortium=CONSORTIUM,
        run_id=RUN,
        round=1,
        jobs=jobs,
        blobs={ALL_SITES: GLOBAL},
        now=NOW,
    )


def _answer(world: Any, job: JobHeader, *, with_update: bool = False) -> str:
    storage, _, _, sites = world
    answer_id = uuid.uuid4()
    ref = None
    if with_update:
        update = weights.dumps([np.ones((2, 2), np.float32), np.ones(2, np.float32)])
        key = update_key(job.run_id, job.round, answer_id)
        storage.put_bytes(job.bucket, key, update)
        ref = BlobRef(key=key, sha256=sha256_hex(update), size=len(update))
    body = canonical_json(dump(RoundAnswer(mode="train", n_samples=100, metrics={"loss": 0.5}, update=ref)))
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
        now=NOW + timedelta(minutes=1),
        message_id=answer_id,
    )
    storage.put_bytes(job.bucket, object_key(header), seal(header, body, sites[job.site]))
    return object_key(header)


def _phase_replies(world: Any, job: JobHeader) -> None:
    """What a site writes during the aggregation beside its answer: keys (an answer to the setup job), a
    masked blob, and a refusal of a phase job."""
    storage, _, coordinator, sites = world
    common = {
        "consortium": CONSORTIUM,
        "run_id": RUN,
        "round": 1,
        "site": job.site,
        "aggregation_id": uuid.uuid4(),
    }
    setup = SecAggSetup(
        **common,
        purpose="update",
        for_job=job_ref(job),
        sites=list(SITES),
        threshold=2,
        bits=64,
        update=UpdateLayout(shapes=[[2, 2], [2]], clip=64.0, max_samples=1000),
    )
    setup_header, raw = seal_job(
        setup, bucket=job.bucket, signer=coordinator, ttl=timedelta(hours=1), now=NOW
    )
    storage.put_bytes(job.bucket, object_key(setup_header), raw)
    keys = SecAggKeys(**common, c_pk=b"\x01" * 32, s_pk=b"\x02" * 32)
    header, raw = seal_answer(setup_header, keys, signer=sites[job.site], ttl=timedelta(days=1), now=NOW)
    storage.put_bytes(job.bucket, object_key(header), raw)
    storage.put_bytes(job.bucket, f"answers/{RUN}/0001/{uuid.uuid4()}.masked", b"\x00" * 48)
    refusal, raw = seal_refusal(
        setup_header,
        [{"code": "secagg_share_rejected", "field": "shares", "message": "no"}],
        signer=sites[job.site],
        ttl=timedelta(days=1),
        now=NOW,
    )
    storage.put_bytes(job.bucket, object_key(refusal), raw)


def test_a_secure_round_accepts_answers_without_update_and_skips_the_aggregations_replies(world):
    storage, registry, _, _ = world
    sent = _send(world)
    for job in sent.values():
        _answer(world, job)
        _phase_replies(world, job)
    outcome = collect_answers(
        storage, registry, sent, seen_ids=set(), now=NOW + timedelta(minutes=5), secure_aggregation=True
    )  # type: ignore[arg-type]
    assert {s: o.status for s, o in outcome.sites.items()} == dict.fromkeys(SITES, SiteStatus.ACCEPTED)
    for o in outcome.sites.values():
        assert o.update is None and o.answer is not None and o.answer.update is None
        assert o.warnings == ()  # the phase replies and the masked blob are not this collector's


def test_a_secure_answer_that_carries_its_update_is_rejected_and_never_used(world):
    storage, registry, _, _ = world
    sent = _send(world)
    _answer(world, sent["bank-a"], with_update=True)
    outcome = collect_answers(
        storage, registry, sent, seen_ids=set(), now=NOW + timedelta(minutes=5), secure_aggregation=True
    )  # type: ignore[arg-type]
    site = outcome.sites["bank-a"]
    assert site.status is SiteStatus.REJECTED and site.update is None
    assert site.rejection is not None and site.rejection.field == "payload.update"
    assert "under secure aggregation an answer carries no update" in site.rejection.message


def test_outside_secure_aggregation_a_phase_reply_is_still_a_rejection(world):
    storage, registry, _, _ = world
    sent = _send(world)
    _phase_replies(world, sent["bank-a"])
    outcome = collect_answers(storage, registry, sent, seen_ids=set(), now=NOW + timedelta(minutes=5))  # type: ignore[arg-type]
    site = outcome.sites["bank-a"]
    assert site.status is SiteStatus.REJECTED and site.rejection is not None
    assert site.rejection.reason_code in {"wrong_payload_schema", "unbound_answer"}
