"""The coordinator's decisions over a round: who is excluded and why, the quorum, the statistics merge, which
updates fit, the aggregate — with arrays and counts checkable by hand — and one whole run (statistics, two
train rounds, evaluation) against the real site library over in-memory buckets and local Ed25519 keys
(tests/integration/test_federated_dag.py runs the DAG against SeaweedFS + OpenBao)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import weights
from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.exchange import RUN_ID_PATTERN, JobHeader, MessageKind, make_header
from lepton_tasks.core.features import CategoricalStats, NumericStats, SufficientStats
from lepton_tasks.core.messages import (
    GlobalWeightsMeta,
    MergedStatistics,
    ModelVersion,
    PrivacyCharge,
    RegistryEntry,
    RoundAnswer,
    RoundJob,
    RunMetrics,
    TrainerHParams,
    load,
)
from lepton_tasks.core.metrics import score_summary
from lepton_tasks.core.outbound_log import OutboundLog
from lepton_tasks.core.privacy import epsilon_of, gaussian_privacy_charge
from lepton_tasks.federation.coordinator import (
    ExclusionKind,
    QuorumError,
    RoundNotComplete,
    RunSetupError,
    aggregate_updates,
    blocked_by,
    check_quorum,
    decide_round,
    exclusion_of,
    merge_statistics,
    select_sites,
    send_jobs,
    start_run,
    usable_updates,
)
from lepton_tasks.federation.enrollment import SiteEntry, SiteRegistry, pin_site_key
from lepton_tasks.federation.exchange import Rejection, SiteOutcome, SiteStatus
from lepton_tasks.federation.publish import publish_run, run_metrics
from lepton_tasks.federation.run_records import (
    Exclusion,
    exchange_run_id,
    read_record,
    read_sent,
    read_spec,
    round_deadline,
)
from lepton_tasks.site.jobs import run_pending
from lepton_tasks.site.state import SiteState
from tests.unit.site.fakes import CONSORTIUM, LocalSigner, MemoryStorage, site_policy

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
BUCKET = "models"
HP = TrainerHParams(
    local_epochs=1, local_only_epochs=2, batch_size=32, learning_rate=0.01, seed=7, fedprox_mu=0
)


def _job(site: str = "bank-a", round_: int = 1) -> JobHeader:
    header = make_header(
        MessageKind.JOB,
        consortium=CONSORTIUM,
        run_id="run-1",
        round=round_,
        site=site,
        bucket=f"exchange-{site}",
        payload=b"{}",
        payload_schema=RoundJob.payload_schema,
        ttl=timedelta(hours=1),
        now=NOW,
    )
    assert isinstance(header, JobHeader)
    return header


def _stats(contract: Contract, **numeric: tuple[int, float, float]) -> SufficientStats:
    base = SufficientStats.empty(contract)
    return base.model_copy(
        update={
            "numeric": {c: NumericStats(count=n, sum=s, sum_sq=q) for c, (n, s, q) in numeric.items()},
            "rows": max(n for n, _, _ in numeric.values()),
        }
    )


# ------------------------------------------------------------------------------------------ run ids, sites


def test_exchange_run_ids_fit_the_envelope_and_stay_apart():
    a = exchange_run_id("manual__2026-01-01T00:00:00+00:00")
    b = exchange_run_id("manual__2026-01-01T00:00:00-00:00")
    assert re.fullmatch(RUN_ID_PATTERN, a) and re.fullmatch(RUN_ID_PATTERN, b)
    assert a.startswith("manual__2026-01-01T00-00-00-00-00-")
    assert a != b and a == exchange_run_id("manual__2026-01-01T00:00:00+00:00")
    assert re.fullmatch(RUN_ID_PATTERN, exchange_run_id("x" * 300 + ":"))


def _entry(site: str, consortium: str = CONSORTIUM, pinned: bool = True) -> SiteEntry:
    signer = LocalSigner(site)
    pin = (
        {
            "public_key": signer.public_key_b64,
            "key_version": 1,
            "fingerprint": signer.fingerprint,
            "pinned_at": NOW,
        }
        if pinned
        else {}
    )
    return SiteEntry(
        site=site, consortium=consortium, bucket=f"exchange-{site}", s3_user=site, enrolled_at=NOW, **pin
    )


def test_select_sites_takes_every_pinned_site_of_the_consortium_by_default():
    entries = {
        "bank-a": _entry("bank-a"),
        "bank-b": _entry("bank-b"),
        "bank-c": _entry("bank-c", pinned=False),
        "shop-x": _entry("shop-x", consortium="retail"),
    }
    assert select_sites(entries, None, consortium=CONSORTIUM, min_partners=2) == ["bank-a", "bank-b"]
    assert select_sites(entries, ["bank-b", "bank-a", "bank-b"], consortium=CONSORTIUM, min_partners=1) == [
        "bank-a",
        "bank-b",
    ]
    with pytest.raises(
        QuorumError, match=r"only 2 site\(s\).*min_partners=3; enrolled but not pinned: bank-c"
    ):
        select_sites(entries, [], consortium=CONSORTIUM, min_partners=3)
    with pytest.raises(RunSetupError) as err:
        select_sites(entries, ["bank-a", "bank-c", "bank-z", "shop-x"], consortium=CONSORTIUM, min_partners=1)
    assert "bank-c: its key is not pinned yet" in str(err.value)
    assert "bank-z: not enrolled" in str(err.value)
    assert "shop-x: enrolled in consortium 'retail'" in str(err.value)


# ------------------------------------------------------------------------------------------- exclusions


def test_every_outcome_becomes_the_exclusion_the_report_names():
    job = _job()
    accepted = SiteOutcome("bank-a", SiteStatus.ACCEPTED, job, answer=RoundAnswer(mode="train", n_samples=3))
    assert exclusion_of(accepted, 1) is None
    assert exclusion_of(SiteOutcome("bank-a", SiteStatus.PENDING, job), 1) is None

    missing = exclusion_of(
        SiteOutcome("bank-a", SiteStatus.MISSING, job, reason="no answer or refusal before the job expired"),
        1,
    )
    assert missing == Exclusion(
        site="bank-a",
        round=1,
        kind=ExclusionKind.DEADLINE_MISSED,
        reason="no answer or refusal before the job expired",
    )

    reasons = ({"code": "strategy_not_allowed", "field": "strategy", "message": "no krum here"},)
    refused = exclusion_of(
        SiteOutcome("bank-a", SiteStatus.REFUSED, job, reasons=reasons, reason="refused by the site: …"), 1
    )
    assert refused is not None and (refused.kind, refused.code) == (
        ExclusionKind.REFUSED,
        "strategy_not_allowed",
    )
    assert refused.describe() == "refused (strategy_not_allowed): refused by the site: …"

    failed = ({"code": "training_failed", "field": "trainer", "message": "exit code 1"},)
    training = exclusion_of(SiteOutcome("bank-a", SiteStatus.REFUSED, job, reasons=failed, reason="r"), 1)
    assert training is not None and training.kind is ExclusionKind.TRAINING_FAILED
    both = exclusion_of(
        SiteOutcome("bank-a", SiteStatus.REFUSED, job, reasons=failed + reasons, reason="r"), 1
    )
    assert both is not None and both.kind is ExclusionKind.REFUSED  # a policy reason is the site's decision
    assert both.code == "training_failed,strategy_not_allowed"

    tampered = Rejection(
        "tampered_payload", "the payload does not hash to the signed sha256", "answers/k.json"
    )
    rejected = exclusion_of(
        SiteOutcome(
            "bank-a", SiteStatus.REJECTED, job, rejection=tampered, reason="its reply was rejected (…)"
        ),
        1,
    )
    assert rejected is not None
    assert (rejected.kind, rejected.code) == (ExclusionKind.VERIFICATION_FAILED, "tampered_payload")
    unreadable = Rejection("unreadable", "cannot list exchange-bank-a: timeout")
    out = exclusion_of(SiteOutcome("bank-a", SiteStatus.REJECTED, job, rejection=unreadable, reason="x"), 1)
    assert out is not None and out.kind is ExclusionKind.UNREADABLE


def test_the_quorum_error_names_every_excluded_site_and_why():
    exclusions = [
        Exclusion(
            site="bank-c", round=2, kind=ExclusionKind.REFUSED, code="strategy_not_allowed", reason="no"
        ),
        Exclusion(
            site="bank-b", round=2, kind=ExclusionKind.VERIFICATION_FAILED, code="bad_signature", reason="x"
        ),
    ]
    check_quorum(2, "train", ["bank-a", "bank-d"], exclusions, min_partners=2)  # exactly the quorum: fine
    with pytest.raises(QuorumError) as err:
        check_quorum(2, "train", ["bank-a"], exclusions, min_partners=2)
    assert str(err.value) == (
        "round 2 (train) is below quorum: 1 usable site(s) (bank-a), min_partners=2. Excluded: "
        "bank-b: verification_failed (bad_signature): x; bank-c: refused (strategy_not_allowed): no"
    )


# --------------------------------------------------------------------------------------------- statistics


def test_statistics_are_summed_and_unusable_ones_are_excluded():
    contract = load_contract("banks")
    a = _stats(contract, balance=(2, 300.0, 50_000.0), income=(1, 10.0, 100.0))
    b = _stats(contract, balance=(3, 600.0, 130_000.0), income=(3, 30.0, 500.0))
    other = a.model_copy(update={"contract_version": 99})
    answers = {
        "bank-a": RoundAnswer(mode="statistics", n_samples=2, statistics=a),
        "bank-b": RoundAnswer(mode="statistics", n_samples=3, statistics=b),
        "bank-c": RoundAnswer(mode="statistics", n_samples=9),
        "bank-d": RoundAnswer(mode="statistics", n_samples=2, statistics=other),
    }
    merged, sites, out = merge_statistics(answers, contract)
    assert sites == ["bank-a", "bank-b"]
    assert merged is not None and merged.rows == 5
    assert merged.numeric["balance"] == NumericStats(count=5, sum=900.0, sum_sq=180_000.0)
    assert merged.numeric["income"] == NumericStats(count=4, sum=40.0, sum_sq=600.0)
    assert merged.categorical["student"] == CategoricalStats()
    assert [(e.site, e.kind, e.code) for e in out] == [
        ("bank-c", ExclusionKind.UNUSABLE, "no_statistics"),
        ("bank-d", ExclusionKind.UNUSABLE, "wrong_statistics"),
    ]
    assert "banks@v99, not banks@v1" in out[1].reason


# ---------------------------------------------------------------------------------------------- updates


def test_updates_that_do_not_fit_the_global_model_are_excluded_with_the_layer():
    ref = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
    good = ("bank-a", [np.ones((2, 2), np.float32), np.ones(2, np.float32)], 1)
    shape = ("bank-b", [np.ones((2, 3), np.float32), np.ones(2, np.float32)], 1)
    nan = ("bank-c", [np.ones((2, 2), np.float32), np.array([1.0, np.nan], np.float32)], 1)
    short = ("bank-d", [np.ones((2, 2), np.float32)], 1)
    ints = ("bank-e", [np.ones((2, 2), np.int32), np.ones(2, np.float32)], 1)
    ok, out = usable_updates([good, shape, nan, short, ints], ref, 3)
    assert [s for s, _, _ in ok] == ["bank-a"]
    assert {e.site: e.reason for e in out} == {
        "bank-b": "layer 0 has shape (2, 3); the global model's is (2, 2)",
        "bank-c": "layer 1 holds NaN or Inf",
        "bank-d": "the update has 1 layers; the global model has 2",
        "bank-e": "layer 0 has dtype int32, not a float",
    }
    assert {e.kind for e in out} == {ExclusionKind.UNUSABLE} and {e.round for e in out} == {3}


def test_the_aggregate_is_the_runs_strategy_over_the_usable_updates():
    ups = [
        ("bank-a", [np.array([1.0, 1.0], np.float32)], 1),
        ("bank-b", [np.array([3.0, 3.0], np.float32)], 3),
        ("bank-c", [np.array([100.0, -2.0], np.float32)], 1),
    ]
    np.testing.assert_allclose(aggregate_updates("fedavg", ups)[0], [(1 + 9 + 100) / 5, (1 + 9 - 2) / 5])
    np.testing.assert_allclose(aggregate_updates("fedprox", ups[:2])[0], [2.5, 2.5])
    np.testing.assert_allclose(aggregate_updates("median", ups)[0], [3.0, 1.0])


# ------------------------------------------------------------------------------- a whole run, in memory


class Buckets(MemoryStorage):
    """MemoryStorage plus the JSON helpers of ``adapters.storage.Storage`` that the coordinator uses."""

    def put_json(self, bucket: str, key: str, obj: Any) -> str:
        return self.put_bytes(bucket, key, json.dumps(obj).encode())

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def put_file(self, bucket: str, key: str, path: Path, **_: Any) -> str:
        return self.put_bytes(bucket, key, Path(path).read_bytes())


class Site:
    """A site as the site library runs it, with a numpy stand-in trainer (global + delta, n samples)."""

    def __init__(self, name: str, coordinator: LocalSigner, root: Path, delta: float, n: int, **policy: Any):
        self.name, self.delta, self.n = name, delta, n
        self.signer = LocalSigner(name)
        self.policy = site_policy(coordinator, name, **policy)
        self.state = SiteState(root / name / "state.json")
        self.outbound = OutboundLog(root / name / "outbound.jsonl")

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        contract = load_contract(job.dataset)
        if job.mode == "statistics":
            stats = _stats(contract, balance=(self.n, 10.0 * self.n, 0.0), income=(self.n, 1.0, 1.0))
            return RoundAnswer(mode="statistics", n_samples=self.n, statistics=stats), None
        assert global_weights is not None and job.statistics is not None and job.feature_names
        arrays, _ = weights.loads(global_weights)
        if job.mode == "train":
            update = [a + np.float32(self.delta) for a in arrays]
            charge = PrivacyCharge(
                noise_multiplier=1.1,
                sampling_rate=0.01,
                steps=100,
                l2_clip=1.0,
                delta=1e-5,
                epsilon_this_update=0.4,
            )
            answer = RoundAnswer(mode="train", n_samples=self.n, metrics={"loss": 0.5}, privacy=charge)
            return answer, weights.dumps(update)
        y = np.array([0, 1, 0, 1], float)
        p = np.array([0.1, 0.9, 0.2, 0.4 + self.delta / 100])
        evaluation = {"auc": 1.0, "n": 4, "score_summary": score_summary(y, p)}
        answer = RoundAnswer(mode="evaluate", n_samples=4, evaluation=evaluation, privacy=RELEASE)
        return answer, None

    def poll(self, storage: Buckets) -> None:
        run_pending(
            storage,  # type: ignore[arg-type]
            f"exchange-{self.name}",
            policy=self.policy,
            state=self.state,
            run_trainer=self.trainer,
            signer=self.signer,
            outbound_log=self.outbound,
        )


SHAPES = ((3, 2), (2,))
CHARGE = PrivacyCharge(
    noise_multiplier=1.1, sampling_rate=0.01, steps=100, l2_clip=1.0, delta=1e-5, epsilon_this_update=0.4
)
#: the evaluation's score histogram under DP: one Gaussian release (what a site's ledger charges for it)
RELEASE = gaussian_privacy_charge(1.1, 1e-5)


def _initial(contract: Contract, feature_names: Sequence[str], seed: int) -> list[np.ndarray]:
    assert feature_names and seed == HP.seed
    return [np.zeros(s, np.float32) for s in SHAPES]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Buckets, SiteRegistry, LocalSigner, dict[str, Site]]]:
    storage, coordinator = Buckets(), LocalSigner("coordinator")
    storage.ensure_bucket(BUCKET)
    registry = SiteRegistry(tmp_path / "sites.yaml")
    sites = {
        "bank-a": Site("bank-a", coordinator, tmp_path, 1.0, 100, min_partners=1),
        "bank-b": Site("bank-b", coordinator, tmp_path, 2.0, 300, min_partners=1),
        # refuses every job of a fedavg run: its policy allows the median only
        "bank-c": Site(
            "bank-c", coordinator, tmp_path, 4.0, 600, min_partners=1, allowed_strategies={"median"}
        ),
    }
    for name, site in sites.items():
        storage.ensure_bucket(f"exchange-{name}")
        registry.put(
            _entry(name).model_copy(
                update={k: None for k in ("public_key", "key_version", "fingerprint", "pinned_at")}
            )
        )
        pin_site_key(registry, name, site.signer.public_key_b64, site.signer.fingerprint, now=NOW)
    yield storage, registry, coordinator, sites


def _play(world: Any, run_id: str, round_: int) -> Any:
    storage, registry, coordinator, sites = world
    send_jobs(storage, BUCKET, coordinator, registry, read_spec(storage, BUCKET, run_id), round_)
    for site in sites.values():
        site.poll(storage)
    return decide_round(storage, BUCKET, registry, run_id, round_, build_initial=_initial)


def _start(world: Any, min_partners: int) -> str:
    storage, registry, _, _ = world
    spec = start_run(
        storage,  # type: ignore[arg-type]
        BUCKET,
        registry,
        airflow_run_id=f"manual__{uuid.uuid4()}",
        consortium=CONSORTIUM,
        dataset="banks",
        sites=None,
        rounds=2,
        strategy="fedavg",
        min_partners=min_partners,
        round_deadline_minutes=30,
        hparams=HP,
        now=NOW,
    )
    return spec.run_id


def test_a_whole_run_excludes_the_refusing_site_every_round_and_the_others_carry_it(world, tmp_path):
    storage, registry, *_ = world
    run_id = _start(world, min_partners=2)
    assert (
        blocked_by(storage, BUCKET, run_id, 1)
        == "round 0 (statistics) did not complete: see `statistics.collect`'s log"
    )

    stats = _play(world, run_id, 0)
    assert (stats.mode, stats.accepted) == ("statistics", ["bank-a", "bank-b"])
    merged = load(MergedStatistics, storage.get_bytes(BUCKET, f"federated/{run_id}/stats.json"), where="s")
    assert merged.statistics.numeric["balance"] == NumericStats(count=400, sum=4000.0, sum_sq=0.0)
    assert merged.feature_names == ["student=No", "student=Yes", "balance", "income", "income__missing"]
    assert merged.sites == ["bank-a", "bank-b"]
    _, meta = weights.loads(storage.get_bytes(BUCKET, f"federated/{run_id}/round-0000/global.npz"))
    assert load(GlobalWeightsMeta, meta, where="round 0").round == 0  # the initial weights: round 0

    expected = [np.zeros(s, np.float32) for s in SHAPES]
    for k in (1, 2):
        record = _play(world, run_id, k)
        assert record.accepted == ["bank-a", "bank-b"]
        assert record.metrics["bank-b"] == {"loss": 0.5, "n": 300}
        expected = [e + np.float32((1.0 * 100 + 2.0 * 300) / 400) for e in expected]  # fedavg: +1.75
        arrays, meta = weights.loads(
            storage.get_bytes(BUCKET, f"federated/{run_id}/round-{k:04d}/global.npz")
        )
        for got, want in zip(arrays, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        assert load(GlobalWeightsMeta, meta, where=f"round {k}") == GlobalWeightsMeta(
            run_id=run_id, round=k, strategy="fedavg", sites=["bank-a", "bank-b"]
        )
    evaluation = _play(world, run_id, 3)
    assert evaluation.mode == "evaluate" and evaluation.overall is not None and evaluation.overall["n"] == 8
    assert evaluation.metrics["bank-a"] == {"auc": 1.0, "n": 4}
    assert blocked_by(storage, BUCKET, run_id, 4) is None

    for record in (stats, evaluation):
        [c] = record.exclusions
        assert (c.site, c.kind, c.code) == ("bank-c", ExclusionKind.REFUSED, "strategy_not_allowed")
        assert "strategy 'fedavg' is not allowed here (allowed: median)" in c.reason
    spec = read_spec(storage, BUCKET, run_id)
    metrics = run_metrics(storage, BUCKET, spec)
    assert sorted(metrics.excluded) == [
        f"bank-c (round {k}, {m})"
        for k, m in ((0, "statistics"), (1, "train"), (2, "train"), (3, "evaluate"))
    ]
    assert [(e.site, e.round, e.mode, e.kind) for e in metrics.exclusions][:2] == [
        ("bank-c", 0, "statistics", ExclusionKind.REFUSED),
        ("bank-c", 1, "train", ExclusionKind.REFUSED),
    ]
    assert metrics.statistics_round.round == 0 and sorted(metrics.statistics_round.partners) == [
        "bank-a",
        "bank-b",
    ]
    assert [r.round for r in metrics.rounds] == [1, 2]
    assert metrics.rounds[0].partners["bank-b"] == {"loss": 0.5, "n": 300}
    assert metrics.final.overall["n"] == 8 and metrics.lineage.published_round == 2
    assert metrics.lineage.sites == ["bank-a", "bank-b"] and metrics.model_version is None
    # what protected the run: each site's two DP-SGD charges and its evaluation's release, composed by the
    # accountant (the report must not leave out the histogram's cost)
    privacy = metrics.privacy
    assert privacy.secure_aggregation is False and set(privacy.sites) == {"bank-a", "bank-b"}
    assert privacy.sites["bank-a"].rounds_charged == 3
    composed = epsilon_of([CHARGE, CHARGE, RELEASE], 1e-5)
    assert privacy.sites["bank-a"].epsilon_run == pytest.approx(composed)
    assert composed > epsilon_of([CHARGE, CHARGE], 1e-5)

    # publish: every object it writes reads back through its model
    published = publish_run(storage, BUCKET, spec, report_dir=tmp_path / "report", save_keras=False)
    prefix = f"federated/{run_id}/"
    written = load(RunMetrics, storage.get_bytes(BUCKET, prefix + "metrics.json"), where="metrics.json")
    assert written == metrics.model_copy(update={"model_version": 1}) and published["version"] == 1
    assert load(RunMetrics, (tmp_path / "report" / "metrics.json").read_text(), where="local") == written
    version = load(ModelVersion, storage.get_bytes(BUCKET, prefix + "model/VERSION.json"), where="VERSION")
    assert (version.version, version.run_id, version.lineage) == (1, run_id, metrics.lineage)
    entry = load(RegistryEntry, storage.get_bytes(BUCKET, "_registry/banks/000001.json"), where="registry")
    assert entry == RegistryEntry(run_id=run_id, version=1)
    assert storage.get_bytes(BUCKET, prefix + "model/global.npz") == storage.get_bytes(
        BUCKET, f"{prefix}round-0002/global.npz"
    )
    page = storage.get_bytes(BUCKET, prefix + "report.html").decode()
    assert "bank-c (round 1, train)" in page and "strategy_not_allowed" in page
    assert publish_run(storage, BUCKET, spec, report_dir=tmp_path / "again", save_keras=False)["version"] == 1
    # a decided round is not decided again (the record is the commit)
    assert decide_round(storage, BUCKET, registry, run_id, 1, build_initial=_initial) == read_record(
        storage, BUCKET, run_id, 1
    )


def test_below_quorum_the_round_fails_with_one_message_and_the_record_says_why(world):
    storage = world[0]
    run_id = _start(world, min_partners=3)
    with pytest.raises(QuorumError) as err:
        _play(world, run_id, 0)
    assert str(err.value).startswith(
        "round 0 (statistics) is below quorum: 2 usable site(s) (bank-a, bank-b), min_partners=3. "
        "Excluded: bank-c: refused (strategy_not_allowed): refused by the site: strategy_not_allowed"
    )
    record = read_record(storage, BUCKET, run_id, 0)
    assert record is not None and not record.quorum_met and [e.site for e in record.exclusions] == ["bank-c"]
    assert blocked_by(storage, BUCKET, run_id, 1) == (
        "round 0 (statistics) did not complete: see `statistics.collect`'s log"
    )
    assert not storage.exists(BUCKET, f"federated/{run_id}/stats.json")


def test_a_round_with_a_silent_site_waits_until_the_deadline_then_names_it(world):
    storage, registry, coordinator, sites = world
    run_id = _start(world, min_partners=2)
    send_jobs(storage, BUCKET, coordinator, registry, read_spec(storage, BUCKET, run_id), 0)
    sites["bank-a"].poll(storage)
    sites["bank-b"].poll(storage)  # bank-c stays silent
    deadline = round_deadline(read_sent(storage, BUCKET, run_id, 0))
    with pytest.raises(RoundNotComplete, match=f"waiting for bank-c until {re.escape(deadline.isoformat())}"):
        decide_round(storage, BUCKET, registry, run_id, 0, build_initial=_initial)
    assert read_record(storage, BUCKET, run_id, 0) is None
    later = deadline + timedelta(seconds=1)
    record = decide_round(storage, BUCKET, registry, run_id, 0, now=later, build_initial=_initial)
    [c] = record.exclusions
    assert (c.site, c.kind) == ("bank-c", ExclusionKind.DEADLINE_MISSED)
    assert c.reason.startswith(f"no answer or refusal before the job expired at {deadline.isoformat()}")
    assert record.accepted == ["bank-a", "bank-b"]
    # sending again (a retried task) sends nothing new: the headers recorded are returned
    before = storage.puts()
    again = send_jobs(storage, BUCKET, coordinator, registry, read_spec(storage, BUCKET, run_id), 0)
    assert storage.puts() == before and set(again) == set(sites)
