"""The pure parts of the site's trainer (lepton_tasks.site.training) and of its exchange watcher's memory
(plugins/lepton_airflow/exchange_trigger.poll): which drops a job trains on, what a statistics answer holds,
how the trainer's outputs become answers (and what never leaves), and that each job key is announced once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import weights
from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.features import CategoricalStats, NumericStats, SufficientStats
from lepton_tasks.core.messages import (
    DPTraining,
    EvalResult,
    Manifest,
    PrivacyCharge,
    RoundJob,
    TrainerHParams,
    UpdateMeta,
    dump,
)
from lepton_tasks.site.training import (
    NoUsableData,
    SiteTrainingError,
    evaluation_answer,
    job_label,
    local_run_id,
    select_drops,
    site_hparams,
    site_plan,
    statistics_answer,
    update_answer,
)

SHA = "ab" * 32
OTHER = "cd" * 32


def _stats(rows: int, balance_sum: float, yes: int) -> SufficientStats:
    return SufficientStats(
        dataset="banks",
        contract_version=1,
        rows=rows,
        numeric={"balance": NumericStats(count=rows, sum=balance_sum, sum_sq=balance_sum * 10)},
        categorical={"student": CategoricalStats(counts={"Yes": yes, "No": rows - yes})},
        label_counts={"Yes": yes, "No": rows - yes},
    )


def _m(
    source: str, staged_at: str, drop_id: str, *, contract_sha: str = SHA, rows: int = 8, yes: int = 2
) -> Manifest:
    return Manifest(
        partner="site-a",
        dataset="banks",
        drop_id=drop_id,
        drop_sha256=SHA,
        source={"bucket": "inbox-site-a", "key": source, "etag": "e", "size": 1},
        contract="banks@v1",
        contract_sha256=contract_sha,
        rows={"train": rows, "holdout": 2},
        cleaning={},
        statistics_train=_stats(rows, 100.0 * rows, yes),
        encryption={
            "scheme": "tink-streaming-aead/AES256_GCM_HKDF_1MB+vault-transit",
            "key_name": "lepton-site-a",
            "key_version": 1,
        },
        objects={
            "train": {"key": f"site-a/banks/{drop_id}/train.parquet.enc", "sha256": SHA},
            "holdout": {"key": f"site-a/banks/{drop_id}/holdout.parquet.enc", "sha256": SHA},
        },
        staged_at=datetime.fromisoformat(staged_at),
    )


def _job(mode: str = "train", *, dp: DPTraining | None = None, strategy: str = "fedprox") -> RoundJob:
    contract = load_contract("banks")
    return RoundJob(
        mode=mode,
        dataset="banks",
        contract=contract.document(),
        contract_sha256=contract.sha256,
        strategy=strategy,
        rounds=4,
        min_partners=2,
        hparams=TrainerHParams(
            local_epochs=3,
            local_only_epochs=12,
            batch_size=16,
            learning_rate=0.02,
            seed=7,
            fedprox_mu=0.01,
            dp=dp,
        ),
    )


# ---------------------------------------------------------------------------------------- drops, stats


def test_a_job_trains_on_the_latest_drop_per_inbox_file_under_the_jobs_contract_only():
    manifests = {
        "site-a/banks/1/manifest.json": _m("banks/may.csv", "2026-11-01T10:00:00+00:00", "1"),
        "site-a/banks/2/manifest.json": _m("banks/may.csv", "2026-11-02T10:00:00+00:00", "2"),  # re-upload
        "site-a/banks/3/manifest.json": _m("banks/june.csv", "2026-11-02T10:00:00+00:00", "3"),
        "site-a/banks/4/manifest.json": _m(
            "banks/july.csv", "2026-11-03T10:00:00+00:00", "4", contract_sha=OTHER
        ),
    }
    keep, excluded = select_drops(manifests, SHA)
    assert keep == ["site-a/banks/2/manifest.json", "site-a/banks/3/manifest.json"]
    assert excluded["site-a/banks/1/manifest.json"] == "superseded by site-a/banks/2/manifest.json"
    assert "not the job's" in excluded["site-a/banks/4/manifest.json"]
    assert set(keep) | set(excluded) == set(manifests)


def test_a_statistics_answer_is_the_sum_of_the_drops_additive_statistics_and_nothing_else():
    a = _m("banks/may.csv", "2026-11-01T10:00:00+00:00", "1", rows=8, yes=2)
    b = _m("banks/june.csv", "2026-11-02T10:00:00+00:00", "2", rows=12, yes=5)
    answer = statistics_answer([a, b])
    assert answer.mode == "statistics" and answer.n_samples == 20 and answer.update is None
    assert answer.statistics is not None
    s = answer.statistics
    assert s.rows == 20 and s.label_counts == {"Yes": 7, "No": 13}
    assert s.numeric["balance"] == NumericStats(count=20, sum=2000.0, sum_sq=20000.0)
    assert s.categorical["student"].counts == {"No": 13, "Yes": 7}
    # only counts and sums: no extreme of any column (a single record's exact value) can be in it
    text = str(dump(answer))
    assert "min" not in text and "max" not in text


def test_no_drop_means_no_statistics_rather_than_an_empty_answer():
    with pytest.raises(NoUsableData, match="no committed drop"):
        statistics_answer([])


# --------------------------------------------------------------------------------------------- the plan


def test_the_local_plan_is_one_partner_with_the_jobs_hyper_parameters():
    dp = DPTraining(noise_multiplier=1.1, l2_clip=0.5, delta=1e-6)
    job = _job(dp=dp)
    manifests = {"site-a/banks/3/manifest.json": _m("banks/june.csv", "2026-11-02T10:00:00+00:00", "3")}
    plan = site_plan(
        job, run_id=local_run_id("fed-1"), partner="site-a", manifests=manifests, feature_names=["x"]
    )
    assert plan.run_id == "exchange-fed-1" and plan.partners == ["site-a"]
    assert [d.manifest for d in plan.drops["site-a"]] == ["site-a/banks/3/manifest.json"]
    assert plan.contract_sha256 == job.contract_sha256
    hp = plan.hparams
    assert (hp.rounds, hp.local_epochs, hp.batch_size, hp.learning_rate, hp.seed) == (4, 3, 16, 0.02, 7)
    assert (hp.strategy, hp.fedprox_mu, hp.min_partners) == ("fedprox", 0.01, 1)
    assert hp.dp_training() == dp  # the trainer gets exactly the job's DP-SGD settings
    assert site_hparams(_job()).dp_training() is None
    with pytest.raises(NoUsableData):
        site_plan(job, run_id="exchange-fed-1", partner="site-a", manifests={}, feature_names=[])


# --------------------------------------------------------------------------------------- the answers


def _update(**over: Any) -> bytes:
    meta = UpdateMeta(
        partner=over.get("partner", "site-a"),
        round=over.get("round", 3),
        run_id=over.get("run_id", "exchange-fed-1"),
        n_samples=40,
        metrics={"loss": 0.5, "auc": 0.7, "n": 40},
        drops=[SHA],
        global_prev_holdout={"auc": 0.66, "n": 10, "score_summary": {"bins": [1, 2]}},
        privacy=over.get("privacy"),
    )
    arrays = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]
    return weights.dumps(arrays, dump(meta))


def test_a_train_answer_carries_metrics_and_weights_but_not_the_trainers_meta():
    charge = PrivacyCharge(
        noise_multiplier=1.1,
        sampling_rate=0.4,
        steps=9,
        l2_clip=1.0,
        delta=1e-5,
        epsilon_this_update=0.8,
    )
    answer, update = update_answer(
        _update(privacy=charge),
        run_id="fed-1",
        round_=2,
        local_run="exchange-fed-1",
        local_round=3,
        partner="site-a",
    )
    assert answer.mode == "train" and answer.n_samples == 40
    assert answer.metrics == {"loss": 0.5, "auc": 0.7, "n": 40}
    assert answer.evaluation == {"auc": 0.66, "n": 10, "score_summary": {"bins": [1, 2]}}
    assert answer.privacy == charge
    arrays, meta = weights.loads(update)
    np.testing.assert_array_equal(arrays[0], np.ones((2, 3), np.float32))
    from lepton_tasks.core.messages import ExchangeUpdateMeta, load

    expected = ExchangeUpdateMeta(run_id="fed-1", round=2, n_samples=40)
    assert load(ExchangeUpdateMeta, meta, where="update") == expected  # no partner name, no drop hashes


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"round": 2}, "round 2, not site-a/exchange-fed-1/round 3"),
        ({"partner": "site-b"}, "site-b"),
        ({"run_id": "exchange-other"}, "exchange-other"),
    ],
)
def test_an_update_of_another_round_partner_or_run_is_not_answered(over, match):
    with pytest.raises(SiteTrainingError, match=match):
        update_answer(
            _update(**over),
            run_id="fed-1",
            round_=2,
            local_run="exchange-fed-1",
            local_round=3,
            partner="site-a",
        )
    with pytest.raises(SiteTrainingError, match="not an update"):
        update_answer(
            b"junk", run_id="fed-1", round_=2, local_run="exchange-fed-1", local_round=3, partner="site-a"
        )


def test_an_evaluation_answer_holds_the_global_models_block_only():
    result = EvalResult(
        partner="site-a",
        run_id="exchange-fed-1",
        global_={"auc": 0.8, "pr_auc": 0.4, "n": 30, "score_summary": {"bins": [3]}, "notes": ["x"]},
        local_models={"site-a": {"auc": 0.7, "score_summary": {"bins": [1]}}},
        rows={"train": 120, "holdout": 30},
    )
    answer = evaluation_answer(dump(result), local_run="exchange-fed-1", partner="site-a")
    assert answer.mode == "evaluate" and answer.n_samples == 30
    assert answer.metrics == {"auc": 0.8, "pr_auc": 0.4, "n": 30}
    assert answer.evaluation is not None and answer.evaluation["score_summary"] == {"bins": [3]}
    assert "local_models" not in str(dump(answer))
    with pytest.raises(SiteTrainingError, match="site-b"):
        evaluation_answer(dump(result), local_run="exchange-fed-1", partner="site-b")


def test_a_job_is_named_by_run_and_round_in_the_grid():
    key = "jobs/fed-1/0003/0b0e8c0e-5a2b-4c9e-9f8e-1c2d3e4f5a6b.json"
    assert job_label(key) == "fed-1 round 3"
    assert job_label("jobs/not-a-job") == "jobs/not-a-job"


# ------------------------------------------------------------------------------- the watcher's memory


def test_the_watcher_announces_each_job_key_once_and_never_a_finished_one():
    from lepton_airflow.exchange_trigger import poll

    a, b, c = (f"jobs/r/0001/{i}.json" for i in "abc")
    announce, memory = poll([a, b], handled=set(), waiting=set(), announced={}, now=100.0)
    assert announce == [a, b]
    announce, memory = poll([a, b, c], handled={a}, waiting=set(), announced=memory, now=110.0)
    assert announce == [c]  # b already announced, a finished
    assert set(memory) == {b, c}
    # b is still unfinished after retry_after (its run failed for good): announced again, once
    announce, memory = poll([b, c], handled=set(), waiting={c}, announced=memory, now=2000.0, retry_after=60)
    assert announce == [b] and memory[b]["tries"] == 1
    assert memory[c]["tries"] == 0  # c waits for its approver: never announced again
    announce, memory = poll([b, c], handled=set(), waiting={c}, announced=memory, now=2030.0, retry_after=60)
    assert announce == []  # the wait doubled
    announce, memory = poll([], handled=set(), waiting=set(), announced=memory, now=2040.0)
    assert announce == [] and memory == {}  # keys that left the bucket are forgotten


def test_a_stack_that_is_no_site_watches_nothing(tmp_path, monkeypatch):
    from lepton_airflow.exchange_trigger import scan

    monkeypatch.setenv("LEPTON_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_LEPTON_S3", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_LEPTON_VAULT", raising=False)
    assert scan() == ([], set(), set())  # no enrollment bundle in <data dir>/site: nothing to poll
