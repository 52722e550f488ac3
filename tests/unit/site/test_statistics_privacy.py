"""A site's statistics round under DP (``site.jobs`` + ``federation.private_statistics``): the statistics
leave as ONE Gaussian release, never exact, whatever the trainer computed; the release is checked against the
site's budget before anything is computed and charged before anything leaves; over budget the job is refused
with ``budget_exhausted``; under secure aggregation the noisy statistics are what the site holds and masks.

Numbers: statistics_epsilon = 1 at delta = 1e-5 → sigma = 4.05 (the smallest sigma whose one Gaussian release
costs at most eps = 1 by the ledger's RDP accountant); the banks contract has K = 9 blocks, so a count gets
noise of std 12.1 and income's centred sum of std 1.5e6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.features import CategoricalStats, NumericStats, SufficientStats
from lepton_tasks.core.messages import DPTraining, RoundAnswer, RoundJob, TrainerHParams
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.site_policy import PrivacyBudget
from lepton_tasks.federation import private_statistics as ps
from lepton_tasks.site.jobs import JobStatus
from lepton_tasks.site.secagg import SiteExchange, held_input
from lepton_tasks.site.state import SiteState
from tests.unit.site import test_jobs_secagg as secagg_tests
from tests.unit.site.fakes import RUN, LocalSigner, MemoryStorage, round_job, site_policy
from tests.unit.site.test_jobs import SITE, World
from tests.unit.site.test_jobs_privacy import SCOPE, _answer, _refusal, budget_policy

N, DELTA = 1200, 1e-5
DP = DPTraining(noise_multiplier=1.1, delta=DELTA, statistics_epsilon=1.0)
ENTRY = ps.statistics_charge(DP, run_id=RUN, round=0, dataset="banks")
EPS = privacy.epsilon_of([ENTRY], DELTA)


def exact_statistics() -> SufficientStats:
    c = load_contract("banks")
    return SufficientStats(
        dataset=c.name,
        contract_version=c.version,
        rows=N,
        numeric={
            "balance": NumericStats(count=N, sum=800.0 * N, sum_sq=(800.0**2 + 480.0**2) * N),
            "income": NumericStats(
                count=N - 10, sum=33_000.0 * (N - 10), sum_sq=3.3e9 * (N - 10), null_count=10
            ),
        },
        categorical={"student": CategoricalStats(counts={"No": 850, "Yes": 350})},
        label_counts={"No": N - 40, "Yes": 40},
    )


def stats_job(dp: DPTraining | None = DP, **overrides: Any) -> RoundJob:
    hparams = TrainerHParams(
        local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.01, seed=7, fedprox_mu=0.0, dp=dp
    )
    return round_job(mode="statistics", hparams=hparams, **overrides)


class StatsWorld(World):
    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        self.trained.append((job, global_weights))
        return RoundAnswer(mode="statistics", n_samples=N, statistics=exact_statistics()), None

    def ledger_entries(self) -> list[privacy.Charge]:
        with self.state.transaction():
            return list(self.state.read_ledger(SCOPE).entries)


@pytest.fixture
def world(tmp_path: Path) -> StatsWorld:
    coordinator = LocalSigner("coordinator")
    return StatsWorld(
        coordinator=coordinator,
        site_signer=LocalSigner("site"),
        storage=MemoryStorage(),
        state=SiteState(tmp_path / "site" / "state.json"),
        log=OutboundLog(tmp_path / "site" / "outbound.jsonl"),
        policy=budget_policy(coordinator),
        trained=[],
    )


def test_the_numbers_of_this_module():
    assert ps.statistics_sigma(DP) == pytest.approx(4.045, abs=1e-3)
    assert 0.999 <= EPS <= 1.0


def test_under_dp_the_statistics_leave_noisy_and_the_release_is_charged_once_before(world):
    outcome = world.handle(world.post(stats_job(), round=0, blob=None))
    answer = _answer(world, outcome)
    exact = exact_statistics()
    assert world.trained and answer.statistics is not None
    assert answer.statistics != exact
    assert answer.statistics.numeric["income"].sum != exact.numeric["income"].sum
    assert answer.statistics.numeric["balance"].sum_sq != exact.numeric["balance"].sum_sq
    assert answer.n_samples == answer.statistics.rows  # the noisy row count, not the exact one
    [entry] = world.ledger_entries()
    assert entry.same_charge(ENTRY)  # ONE GaussianDpEvent(sigma), release="statistics", this run's round 0
    assert answer.privacy == privacy.gaussian_privacy_charge(ps.statistics_sigma(DP), DELTA)
    assert answer.budget is not None and answer.budget.epsilon_spent == pytest.approx(EPS)


def test_over_budget_the_statistics_job_is_refused_before_anything_is_computed(world):
    world.policy = budget_policy(world.coordinator, epsilon=0.5)  # the release alone costs eps = 1
    outcome = world.handle(world.post(stats_job(), round=0, blob=None))
    [reason] = _refusal(world, outcome).reasons
    assert reason["code"] == "budget_exhausted" and reason["epsilon_limit"] == "0.5"
    assert float(reason["epsilon_asked"]) == pytest.approx(EPS, rel=1e-5)
    assert world.trained == [] and world.ledger_entries() == []
    assert not [k for k in world.site_writes() if k.startswith("answers/")]


def test_without_a_budget_the_statistics_are_still_noisy_and_report_their_cost(world):
    world.policy = site_policy(world.coordinator, SITE)
    answer = _answer(world, world.handle(world.post(stats_job(), round=0, blob=None)))
    assert answer.statistics is not None and answer.statistics != exact_statistics()
    assert answer.privacy is not None and answer.budget is None
    assert list(world.state.path.parent.glob("*.privacy*.json")) == []


def test_without_dp_the_statistics_are_exact_and_not_charged(world):
    world.policy = site_policy(world.coordinator, SITE)
    answer = _answer(world, world.handle(world.post(stats_job(dp=None), round=0, blob=None)))
    assert answer.statistics == exact_statistics() and answer.privacy is None and answer.n_samples == N


def test_a_trainer_without_statistics_under_dp_fails_the_task_and_nothing_leaves(world):
    class Empty(StatsWorld):
        def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
            return RoundAnswer(mode="statistics", n_samples=N), None

    empty = Empty(**{k: getattr(world, k) for k in World.__dataclass_fields__})
    with pytest.raises(RuntimeError, match="no statistics"):
        empty.handle(empty.post(stats_job(), round=0, blob=None))
    assert empty.site_writes() == [] and empty.ledger_entries() == []


# ----------------------------------------------------------------------------------- secure aggregation


def test_under_secure_aggregation_the_site_holds_and_masks_the_noisy_statistics(tmp_path: Path):
    coordinator, site_signer, storage = LocalSigner("coordinator"), LocalSigner("site"), MemoryStorage()
    log = OutboundLog(tmp_path / "site" / "outbound.jsonl")
    policy = site_policy(
        coordinator, SITE, min_partners=3, privacy_budget=PrivacyBudget(epsilon=3.0, delta=DELTA)
    )

    class SecureStats(secagg_tests.World):
        def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
            self.trained.append(job)
            return RoundAnswer(mode="statistics", n_samples=N, statistics=exact_statistics()), None

    world = SecureStats(
        coordinator=coordinator,
        site_signer=site_signer,
        storage=storage,
        state=SiteState(tmp_path / "site" / "state.json"),
        log=log,
        policy=policy,
        ctx=SiteExchange.from_policy(
            policy,
            storage=storage,
            bucket=secagg_tests.BUCKET,
            signer=site_signer,
            outbound_log=log,
            box=secagg_tests.AesBox(),
            state_dir=tmp_path / "site",
        ),
        trained=[],
    )
    outcome = world.handle(world.post(stats_job(secure_aggregation=True, min_partners=3)))
    assert outcome.status is JobStatus.ANSWERED and world.trained
    answer_key = next(k for k in outcome.written if k.endswith(".json"))
    payload = secagg_tests._payload(storage, answer_key)
    assert payload.get("statistics") is None and payload["privacy"] is not None
    held = held_input(world.ctx, run_id=RUN, round=1)
    assert held is not None and held.purpose == "statistics"
    kept = SufficientStats.model_validate_json(held.data)
    assert kept != exact_statistics() and kept.rows != 0
    scope = policy.budget_for("banks")
    assert scope is not None
    with world.state.transaction():
        entries = world.state.read_ledger(scope).entries
    assert [(e.release, e.noise_multiplier) for e in entries] == [("statistics", ENTRY.noise_multiplier)]


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _keys(v)}
    return set()


@pytest.mark.parametrize("dp", [DP, None])
def test_no_minimum_or_maximum_ever_leaves_in_a_statistics_answer(world, dp):
    from lepton_tasks.core.messages import dump

    world.policy = site_policy(world.coordinator, SITE)
    sent = _answer(world, world.handle(world.post(stats_job(dp=dp), round=0, blob=None)))
    assert not _keys(dump(sent)) & {"min", "max", "minimum", "maximum"}
    # the answer's schema (what statistics_answer fills from the manifests) has no field for one either
    schema = RoundAnswer.model_json_schema()
    assert not _keys(schema["$defs"]["NumericStats"]["properties"]) & {"min", "max", "minimum", "maximum"}
