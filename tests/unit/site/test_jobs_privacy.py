"""The site's privacy budget: a train job under a budget is checked against the site's ledger before it
trains, refused with ``budget_exhausted`` when it would exceed it, and charged once before anything leaves.

Numbers: 1,200 records, batch 32, one local epoch, sigma 1.0, delta 1e-5 → q = 32/1200, 38 steps a round,
eps = 1.838 for one round alone. The run's evaluation release (evaluation eps 1, sigma 4.05, round 6 of a
5-round run) is reserved with the first round: eps = 2.045 for one round and the reservation, 2.339 for two
and 2.588 for three composed (RDP; summing the rounds alone gives 3.68 after two). A budget of eps = 2.45
therefore admits rounds 1 and 2 and refuses round 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lepton_tasks.adapters.storage import StorageError
from lepton_tasks.core import privacy
from lepton_tasks.core.exchange import AnswerHeader, RefusalHeader, object_key
from lepton_tasks.core.messages import (
    DPTraining,
    PrivacyCharge,
    RoundAnswer,
    RoundJob,
    RoundRefusal,
    TrainerHParams,
    load,
)
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.site_policy import SITE_LEDGER, BudgetScope, DatasetGrant, PrivacyBudget
from lepton_tasks.site.jobs import CannotAnswer, JobOutcome, JobStatus
from lepton_tasks.site.state import SiteState
from tests.unit.site.fakes import RUN, LocalSigner, MemoryStorage, contract, round_job, site_policy
from tests.unit.site.test_jobs import SITE, UPDATE, World

N, BATCH, SIGMA, DELTA = 1200, 32, 1.0, 1e-5
DP = DPTraining(noise_multiplier=SIGMA, delta=DELTA)
PLANNED = privacy.planned_charge(DP, N, BATCH, 1)
#: the evaluation's release of ``RUN`` (5 rounds: the evaluation is round 6), reserved with round 1
RESERVE = privacy.evaluation_charge(DP, run_id=RUN, rounds=5, dataset="banks")
EPS_1, EPS_2, EPS_3 = (privacy.epsilon_of([PLANNED] * k + [RESERVE], DELTA) for k in (1, 2, 3))
LIMIT = 2.45
SCOPE = BudgetScope(ledger="banks", budget=PrivacyBudget(epsilon=LIMIT, delta=DELTA))


def dp_job(dp: DPTraining | None = DP, **overrides: Any) -> RoundJob:
    hparams = TrainerHParams(
        local_epochs=1,
        local_only_epochs=1,
        batch_size=BATCH,
        learning_rate=0.01,
        seed=7,
        fedprox_mu=0.0,
        dp=dp,
    )
    return round_job(hparams=hparams, **overrides)


def budget_policy(coordinator: LocalSigner, *, epsilon: float = LIMIT, **overrides: Any) -> Any:
    _, sha = contract()
    grant = DatasetGrant(
        name="banks", contract_sha256=sha, privacy_budget=PrivacyBudget(epsilon=epsilon, delta=DELTA)
    )
    return site_policy(coordinator, SITE, datasets=(grant,), **overrides)


@dataclass
class DPWorld(World):
    """A site whose trainer reports the DP-SGD charge it trained with (as ``trainer.local`` does)."""

    report_charge: Callable[[RoundJob], PrivacyCharge | None] | None = None

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        self.trained.append((job, global_weights))
        charge = None
        if self.report_charge is not None:
            charge = self.report_charge(job)
        elif job.hparams.dp is not None:
            charge = privacy.planned_charge(
                job.hparams.dp, N, job.hparams.batch_size, job.hparams.local_epochs
            )
        return RoundAnswer(mode="train", n_samples=N, metrics={"loss": 0.25}, privacy=charge), UPDATE

    def ledger(self, scope: BudgetScope = SCOPE) -> privacy.PrivacyLedger:
        with self.state.transaction():
            return self.state.read_ledger(scope)


@pytest.fixture
def world(tmp_path: Path) -> DPWorld:
    coordinator = LocalSigner("coordinator")
    return DPWorld(
        coordinator=coordinator,
        site_signer=LocalSigner("site"),
        storage=MemoryStorage(),
        state=SiteState(tmp_path / "site" / "state.json"),
        log=OutboundLog(tmp_path / "site" / "outbound.jsonl"),
        policy=budget_policy(coordinator),
        trained=[],
    )


def count(job: RoundJob) -> int:
    return N


def _refusal(world: World, outcome: JobOutcome) -> RoundRefusal:
    """The site's refusal as the coordinator reads it (the signature verifies with the site's key)."""
    assert outcome.status is JobStatus.REFUSED and outcome.reply is not None and outcome.header is not None
    header, payload = world.open_reply(outcome.header, object_key(outcome.reply))
    assert isinstance(header, RefusalHeader)
    return load(RoundRefusal, payload, where="test")


def _answer(world: World, outcome: JobOutcome) -> RoundAnswer:
    assert outcome.status is JobStatus.ANSWERED and outcome.reply is not None and outcome.header is not None
    header, payload = world.open_reply(outcome.header, object_key(outcome.reply))
    assert isinstance(header, AnswerHeader)
    return load(RoundAnswer, payload, where="test")


def test_the_numbers_of_this_module():
    assert EPS_1 < EPS_2 < LIMIT < EPS_3
    alone = privacy.epsilon_of([PLANNED], DELTA)
    assert alone + alone > LIMIT  # summing per-round epsilons would refuse round 2: the ledger composes
    assert RESERVE.key == (RUN, 6) and RESERVE.noise_multiplier == pytest.approx(4.0454, abs=1e-4)


# ------------------------------------------------------------------------------------------ within budget


def test_a_job_within_the_budget_is_answered_charged_and_reports_the_ledger(world):
    outcome = world.handle(world.post(dp_job()), sample_count=count)
    answer = _answer(world, outcome)
    assert answer.privacy == PLANNED
    assert answer.budget is not None and answer.budget.ledger == "banks"
    assert answer.budget.epsilon_limit == LIMIT and answer.budget.delta == DELTA
    assert answer.budget.epsilon_spent == pytest.approx(EPS_1)
    assert answer.budget.epsilon_remaining == pytest.approx(LIMIT - EPS_1)

    ledger = world.ledger()
    assert [e.key for e in ledger.entries] == [(RUN, 1), (RUN, 6)]  # the round, and the evaluation reserved
    assert ledger.entries[0].same_charge(privacy.ledger_charge(PLANNED, run_id=RUN, round=1, dataset="banks"))
    assert ledger.entries[1].same_charge(RESERVE)
    path = world.state.ledger_path("banks")
    assert path.parent == world.state.path.parent and path.stat().st_mode & 0o777 == 0o600
    assert privacy.load_ledger(path).entries == ledger.entries


def test_rounds_compose_and_the_round_over_budget_is_refused_before_training(world):
    for round_ in (1, 2):
        assert (
            world.handle(world.post(dp_job(), round=round_), sample_count=count).status is JobStatus.ANSWERED
        )
    before = world.ledger()
    outcome = world.handle(world.post(dp_job(), round=3), sample_count=count)

    [reason] = _refusal(world, outcome).reasons
    assert reason["code"] == "budget_exhausted" and reason["field"] == "hparams.dp"
    assert float(reason["epsilon_spent"]) == pytest.approx(EPS_2, rel=1e-5)
    alone = privacy.epsilon_of([PLANNED], DELTA)
    assert float(reason["epsilon_asked"]) == pytest.approx(alone, rel=1e-5)
    assert float(reason["epsilon_reserved"]) == 0  # reserved with round 1: already in what is spent
    assert float(reason["epsilon_limit"]) == LIMIT
    assert float(reason["epsilon_remaining"]) == pytest.approx(LIMIT - EPS_2, rel=1e-5)
    message = reason["message"]
    assert f"ε spent {EPS_2:.4g}" in message and f"asks ε {alone:.4g}" in message
    assert f"ε limit {LIMIT:g}" in message and f"ε {EPS_3:.4g} composed" in message
    assert len(world.trained) == 2  # refused BEFORE training
    assert world.ledger().entries == before.entries  # a refusal costs nothing
    assert outcome.reply is not None and outcome.written == (object_key(outcome.reply),)  # no update


def test_no_usable_data_is_refused_before_the_approver_is_asked_or_anything_is_charged(world):
    """The budget check counts the site's rows first: with none, the job is refused (signed) right there."""
    world.policy = budget_policy(world.coordinator, approval_required=True)

    def no_rows(job: RoundJob) -> int:
        raise CannotAnswer("no_usable_data", f"{SITE} has no verified, committed banks drop", field="dataset")

    outcome = world.handle(world.post(dp_job()), sample_count=no_rows)
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["no_usable_data"]
    assert world.trained == [] and list(world.ledger().entries) == []
    assert world.state.read().handled == {outcome.key: "refused"}


def test_without_a_sample_count_the_budget_is_enforced_after_training_and_nothing_leaves(world):
    for round_ in (1, 2):
        assert world.handle(world.post(dp_job(), round=round_)).status is JobStatus.ANSWERED
    outcome = world.handle(world.post(dp_job(), round=3))
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["budget_exhausted"]
    assert len(world.trained) == 3  # it trained (the site did not know its count beforehand) …
    assert [k for k in outcome.written if k.endswith(".update")] == []  # … but the update never left
    assert len(world.ledger().entries) == 3  # two rounds and the evaluation's reservation


def test_a_policy_that_lowers_the_budget_applies_to_what_was_already_spent(world):
    assert world.handle(world.post(dp_job()), sample_count=count).status is JobStatus.ANSWERED
    world.policy = budget_policy(world.coordinator, epsilon=EPS_1 * 1.01)
    outcome = world.handle(world.post(dp_job(), round=2), sample_count=count)
    [reason] = _refusal(world, outcome).reasons
    assert reason["code"] == "budget_exhausted"
    assert float(reason["epsilon_limit"]) == pytest.approx(EPS_1 * 1.01, rel=1e-5)


# ------------------------------------------------------------------------------------------- no DP, no budget


def test_a_train_job_without_dp_on_a_budgeted_dataset_is_refused_untrained(world):
    outcome = world.handle(world.post(dp_job(dp=None)), sample_count=count)
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["privacy_required"]
    assert world.trained == [] and world.ledger().entries == []


def test_a_statistics_job_without_dp_on_a_budgeted_dataset_is_refused_uncomputed(world):
    """Its answer would be exact counts, sums and sums of squares: released only with DP under a budget
    (without a budget it is answered exactly: test_statistics_privacy)."""

    class StatsWorld(DPWorld):
        def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
            self.trained.append((job, global_weights))
            return RoundAnswer(mode="statistics", n_samples=N), None

    stats = StatsWorld(**{k: getattr(world, k) for k in World.__dataclass_fields__})
    outcome = stats.handle(stats.post(dp_job(dp=None, mode="statistics"), blob=None), sample_count=count)
    [reason] = _refusal(stats, outcome).reasons
    assert (reason["code"], reason["field"]) == ("privacy_required", "hparams.dp")
    assert "statistics" in reason["message"]
    assert stats.trained == [] and not stats.state.ledger_path("banks").exists()


def test_a_site_without_a_budget_answers_without_a_ledger(world):
    world.policy = site_policy(world.coordinator, SITE)
    answer = _answer(world, world.handle(world.post(dp_job()), sample_count=count))
    assert answer.privacy == PLANNED and answer.budget is None  # the trainer's charge, no ledger
    assert list(world.state.path.parent.glob("*.privacy*.json")) == []


def test_a_site_wide_budget_keeps_one_ledger_beside_the_state(world):
    world.policy = site_policy(
        world.coordinator, SITE, privacy_budget=PrivacyBudget(epsilon=LIMIT, delta=DELTA)
    )
    answer = _answer(world, world.handle(world.post(dp_job()), sample_count=count))
    assert answer.budget is not None and answer.budget.ledger == SITE_LEDGER
    assert world.state.ledger_path(SITE_LEDGER) == world.state.path.with_name("state.privacy.json")
    assert len(privacy.load_ledger(world.state.ledger_path(SITE_LEDGER)).entries) == 2  # + reservation


# ------------------------------------------------------------------------------------------ retries, re-sends


def test_a_retried_job_is_charged_once(world):
    """The answer's upload fails after the charge was recorded; the task's retry costs nothing more."""

    class FailingOnce(MemoryStorage):
        failed = False

        def put_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> str:
            if key.startswith("answers/") and key.endswith(".json") and not self.failed:
                self.failed = True
                raise StorageError(f"cannot write s3://{bucket}/{key}: connection reset")
            return super().put_bytes(bucket, key, data, **kw)

    world.storage = FailingOnce()
    job = world.post(dp_job())
    with pytest.raises(StorageError):
        world.handle(job, sample_count=count)
    assert [e.key for e in world.ledger().entries] == [(RUN, 1), (RUN, 6)]  # charged before anything left
    assert world.state.read().handled == {}  # the job is not finished: the task retries it

    retried = world.handle(job, sample_count=count)
    answer = _answer(world, retried)
    assert [e.key for e in world.ledger().entries] == [(RUN, 1), (RUN, 6)]
    assert answer.budget is not None and answer.budget.epsilon_spent == pytest.approx(EPS_1)


def test_a_job_re_sent_for_a_round_already_answered_is_refused(world):
    assert world.handle(world.post(dp_job()), sample_count=count).status is JobStatus.ANSWERED
    outcome = world.handle(world.post(dp_job()), sample_count=count)  # the same round, a new message
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["round_already_answered"]
    assert len(world.trained) == 1 and len(world.ledger().entries) == 2  # the round and the reservation


def test_a_retry_with_another_mechanism_under_the_same_round_is_refused(world):
    class FailingOnce(MemoryStorage):
        def put_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> str:
            if key.startswith("answers/"):
                raise StorageError("connection reset")
            return super().put_bytes(bucket, key, data, **kw)

    world.storage = FailingOnce()
    with pytest.raises(StorageError):
        world.handle(world.post(dp_job()), sample_count=count)
    world.storage.__class__ = MemoryStorage
    outcome = world.handle(
        world.post(dp_job(DPTraining(noise_multiplier=2.0, delta=DELTA))), sample_count=count
    )
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["privacy_ledger_conflict"]


# ------------------------------------------------------------------------------------- the trainer's word


def test_the_trainers_charge_is_what_the_ledger_records(world):
    """The site planned with 1,200 records; the trainer trained on 2,400: the ledger holds what ran."""
    ran = privacy.planned_charge(DP, 2400, BATCH, 1)
    world.report_charge = lambda job: ran
    answer = _answer(world, world.handle(world.post(dp_job()), sample_count=count))
    assert answer.privacy == ran
    assert world.ledger().entries[0].sampling_rate == ran.sampling_rate


@pytest.mark.parametrize(
    ("reported", "match"),
    [
        (lambda job: None, "reported no DP-SGD charge"),
        (lambda job: privacy.planned_charge(DPTraining(noise_multiplier=0.5), N, BATCH, 1), "σ = 0.5"),
    ],
)
def test_a_trainer_that_did_not_train_as_asked_fails_the_task_and_nothing_leaves(world, reported, match):
    world.report_charge = reported
    with pytest.raises(RuntimeError, match=match):
        world.handle(world.post(dp_job()))  # no sample count: no planned charge to fall back on
    assert world.site_writes() == [] and world.ledger().entries == []


# ------------------------------------------------------------------------------- the evaluation's reservation


def test_a_round_that_fits_alone_is_refused_when_the_evaluation_would_no_longer_fit(world):
    """Without the reservation this round would be answered, and the site would then have to refuse the
    evaluation (its release costs the run's evaluation epsilon): it would drop out of the union AUC."""
    alone = privacy.epsilon_of([PLANNED], DELTA)
    world.policy = budget_policy(world.coordinator, epsilon=(alone + EPS_1) / 2)
    outcome = world.handle(world.post(dp_job()), sample_count=count)
    [reason] = _refusal(world, outcome).reasons
    assert reason["code"] == "budget_exhausted"
    reserved = privacy.epsilon_of([RESERVE], DELTA)
    assert float(reason["epsilon_reserved"]) == pytest.approx(reserved, rel=1e-5) and reserved <= 1.0
    assert float(reason["epsilon_asked"]) == pytest.approx(alone, rel=1e-5)
    assert float(reason["epsilon_spent"]) == 0 and float(reason["epsilon_remaining"]) > alone
    message = reason["message"]
    assert f"the evaluation reserves ε {reserved:.4g} (round 6" in message and "ε remaining" in message
    assert world.trained == [] and world.ledger().entries == []


def test_without_a_sample_count_the_reservation_is_checked_after_training(world):
    alone = privacy.epsilon_of([PLANNED], DELTA)
    world.policy = budget_policy(world.coordinator, epsilon=(alone + EPS_1) / 2)
    outcome = world.handle(world.post(dp_job()))
    assert [r["code"] for r in _refusal(world, outcome).reasons] == ["budget_exhausted"]
    assert len(world.trained) == 1 and world.ledger().entries == []
    assert [k for k in outcome.written if k.endswith(".update")] == []
