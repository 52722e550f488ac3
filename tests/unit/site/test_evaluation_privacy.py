"""What a site sends besides its DP-SGD update, under DP: the evaluation's score histogram leaves noisy,
signed and unbiased (every number in the answer recomputed from it), is charged to the ledger as one Gaussian
release composed with the DP-SGD charges, is refused before training when it does not fit; a train answer's
metrics are dropped; and without DP nothing changes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from lepton_tasks.core import metrics, privacy
from lepton_tasks.core.exchange import object_key
from lepton_tasks.core.messages import DPTraining, EvalResult, RoundAnswer, RoundJob, dump
from lepton_tasks.core.metrics import merge_score_summaries, score_summary, summary_from_counts
from lepton_tasks.site.jobs import JobStatus
from lepton_tasks.site.training import (
    DP_BINS,
    SiteTrainingError,
    _regroup,
    dp_groups,
    evaluation_answer,
    private_evaluation,
    update_answer,
)
from tests.unit.site.fakes import RUN
from tests.unit.site.test_jobs import World
from tests.unit.site.test_jobs_privacy import (
    DELTA,
    DPWorld,
    N,
    _answer,
    _refusal,
    budget_policy,
    count,
    dp_job,
)
from tests.unit.site.test_jobs_privacy import (
    world as world,
)
from tests.unit.site.test_training import _update

DP = DPTraining(noise_multiplier=1.0, delta=DELTA)
#: the evaluation's noise: calibrated from the run's evaluation epsilon (default 1), not the DP-SGD sigma
SIGMA_EVAL = privacy.evaluation_sigma(DP)
#: the key of the evaluation's release in the ledger: round 6 of the 5-round jobs of ``dp_job``
KEY: dict[str, Any] = {"run_id": RUN, "round": 6, "dataset": "banks"}


def _scores(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out labels and scores of a model with AUC about 0.8 (a fixed draw: the EXACT data)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(float)
    logit = rng.normal(-1.5 + 1.6 * y, 1.0)
    return y, 1 / (1 + np.exp(-logit))


def _block(n: int = 3000) -> dict[str, Any]:
    y, p = _scores(n)
    return {**metrics.binary_metrics(y, p), "score_summary": score_summary(y, p), "threshold_note": "exact"}


def _dense(pairs: list[list[int]]) -> np.ndarray:
    out = np.zeros(metrics.N_BINS, np.int64)
    for i, c in pairs:
        out[i] += c
    return out


# ---------------------------------------------------------------------------------------- the histogram


def test_counts_alone_give_the_summary_of_the_exact_predictions():
    y, p = _scores()
    exact = score_summary(y, p)
    rebuilt = summary_from_counts(_dense(exact["pos"]), _dense(exact["neg"]))
    for key in ("n", "positives", "correct", "pos", "neg"):
        assert rebuilt[key] == exact[key]  # correct is exact at threshold 0.5 (a bin edge)
    assert rebuilt["log_loss_sum"] == pytest.approx(exact["log_loss_sum"], rel=1e-3)  # bin centres


def test_the_grouping_is_fixed_keeps_every_count_and_the_order_of_scores():
    group, where = dp_groups()
    assert DP_BINS == 66 and where.size == DP_BINS and (np.diff(where) > 0).all()
    assert (np.diff(group) >= 0).all() and set(group) == set(range(DP_BINS))
    assert (group[where] == np.arange(DP_BINS)).all()  # each count sits inside its own group
    exact = score_summary(*_scores())
    for c in ("pos", "neg"):
        assert _regroup(_dense(exact[c])).sum() == _dense(exact[c]).sum()


def test_the_released_histogram_is_noisy_and_every_metric_comes_from_it():
    block = _block()
    exact = block["score_summary"]
    out = private_evaluation(block, DP)
    noisy = out["score_summary"]
    # the answer is consistent with its own histogram (the coordinator's merge accepts it) …
    merged = merge_score_summaries([noisy])
    for key in metrics.METRIC_KEYS:
        assert out[key] == merged[key]
    # … which is the exact one regrouped to DP_BINS bins per class, plus noise on every bin
    _, where = dp_groups()
    grouped = [_regroup(_dense(exact[c])) for c in ("pos", "neg")]
    released = [_dense(noisy[c]) for c in ("pos", "neg")]
    for g, r in zip(grouped, released, strict=True):
        assert set(np.flatnonzero(r)) <= set(where)
        assert not np.array_equal(r[where], g)
    # signed, not clamped at 0 (the empty groups at the ends of the range come out negative about half the
    # time), and marked as a noisy release
    assert noisy["noisy"] is True and min(int(r[where].min()) for r in released) < 0
    # the total within a statistical bound: noise sd sigma*sqrt(2*DP_BINS), no bias
    n, sd = exact["n"], SIGMA_EVAL * math.sqrt(2 * DP_BINS)
    assert abs(out["n"] - n) <= 6 * sd
    # nothing of the exact block rides along; the noise is the evaluation's (epsilon 1), not DP-SGD's sigma
    assert "threshold_note" not in out and out["dp"]["noise_multiplier"] == SIGMA_EVAL
    assert abs(SIGMA_EVAL - 4.0454) < 1e-4
    assert out["dp"] == {
        "mechanism": "gaussian",
        "noise_multiplier": SIGMA_EVAL,
        "sensitivity": 1.0,
        "bins_per_class": DP_BINS,
        "delta": DELTA,
        "epsilon": 1.0,
    }


def test_no_exact_count_or_metric_leaks_over_many_releases():
    block = _block()
    exact = block["score_summary"]
    _, where = dp_groups()
    grouped = _regroup(_dense(exact["pos"]))
    # an evaluation epsilon whose sigma is about 1
    sigma_1 = DPTraining(noise_multiplier=1.0, delta=DELTA, evaluation_epsilon=4.7285)
    assert privacy.evaluation_sigma(sigma_1) == pytest.approx(1.0, abs=1e-4)
    releases = [private_evaluation(block, sigma_1) for _ in range(30)]
    assert not all(r["n"] == exact["n"] for r in releases)
    assert not all(r["positives"] == exact["positives"] for r in releases)
    assert not all(r["auc"] == block["auc"] for r in releases)
    bins_equal = [np.array_equal(_dense(r["score_summary"]["pos"])[where], grouped) for r in releases]
    assert not any(bins_equal)
    # and the noise averages out: the mean released AUC is near the exact one (the regrouping to DP_BINS
    # bins is the only bias: test_the_released_auc_is_unbiased_on_one_site_and_merged)
    assert float(np.mean([r["auc"] for r in releases])) == pytest.approx(block["auc"], abs=0.01)


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``noisy_counts`` seeds its generator from :mod:`secrets`; here from a fixed sequence, so that the
    statistical checks below are one reproducible draw (they pass or fail the same way every run)."""
    from types import SimpleNamespace

    seeds = np.random.default_rng(20261203)
    monkeypatch.setattr(privacy, "secrets", SimpleNamespace(randbits=lambda _: int(seeds.integers(2**62))))


def _exact_grouped(block: dict[str, Any]) -> dict[str, Any]:
    """The block's histogram regrouped to DP_BINS bins per class, WITHOUT noise: what a release estimates."""
    from lepton_tasks.site.training import _spread

    exact = block["score_summary"]
    return summary_from_counts(*(_spread(_regroup(_dense(exact[c]))) for c in ("pos", "neg")))


def test_the_released_auc_is_unbiased_on_one_site_and_merged(seeded):
    """Many releases at the default evaluation epsilon (sigma 4.05) of a fixed synthetic histogram: the mean
    AUC of the release, and of three sites' releases merged as the coordinator merges them, is the exact AUC
    of the regrouped histogram within 0.01 (6 and 3 standard errors; +0.000 and +0.004 in this draw).
    Clamping the noisy counts at 0 (as the release did until 2026-12-03) fails both by far: -0.05 at one
    3,000-row site, -0.13 for 3 x 1,000 rows."""
    draws = 300
    one = _block(3000)
    exact_one = merge_score_summaries([_exact_grouped(one)])["auc"]
    d_one = [private_evaluation(one, DP)["auc"] - exact_one for _ in range(draws)]
    assert abs(float(np.mean(d_one))) < 0.01
    assert 0.01 < float(np.std(d_one)) < 0.05  # the noise is there (sd 0.03 measured)

    sites = [
        {**metrics.binary_metrics(*_scores(1000, s)), "score_summary": score_summary(*_scores(1000, s))}
        for s in (1, 2, 3)
    ]
    exact_union = merge_score_summaries([_exact_grouped(b) for b in sites])["auc"]
    d_union = []
    for _ in range(draws):
        released = [private_evaluation(b, DP)["score_summary"] for b in sites]
        d_union.append(merge_score_summaries(released)["auc"] - exact_union)
    assert abs(float(np.mean(d_union))) < 0.01


def test_a_noisy_total_below_zero_is_answered_as_no_samples_and_still_leaves(seeded):
    """A release of (almost) no held-out rows can total below 0: no metric, n = 0 in the answer (its
    ``n_samples`` cannot be negative), and the site's check still recognises it as the noisy release."""
    from types import SimpleNamespace

    from lepton_tasks.site.jobs import _only_private

    block = _block(2)
    header = SimpleNamespace(run_id=RUN, round=6)
    job = SimpleNamespace(mode="evaluate")
    negative = 0
    for _ in range(20):
        answer = evaluation_answer(_json(block), local_run="exchange-fed-1", partner="site-a", dp=DP)
        assert answer.evaluation is not None and answer.n_samples is not None
        total = answer.evaluation["score_summary"]["n"]
        assert answer.n_samples == answer.evaluation["n"] == max(total, 0)
        if total < 0:
            negative += 1
            assert answer.evaluation["auc"] is None and answer.evaluation["accuracy"] is None
        released = _only_private(header, job, answer, DP)  # type: ignore[arg-type]
        # the same release, now carrying its cost (a site without a budget reports it too)
        assert released.privacy is not None and released.model_copy(update={"privacy": None}) == answer
    assert 0 < negative < 20


def test_a_block_without_a_histogram_cannot_be_released_under_dp():
    with pytest.raises(SiteTrainingError, match="no score histogram"):
        private_evaluation({"auc": 0.8, "n": 30}, DP)


def _json(block: dict[str, Any]) -> bytes:
    import json

    result = EvalResult(
        partner="site-a", run_id="exchange-fed-1", global_=block, rows={"train": 12000, "holdout": block["n"]}
    )
    return json.dumps(dump(result)).encode()


def test_an_evaluation_answer_under_dp_reports_the_noisy_numbers_only():
    block = _block()
    answer = evaluation_answer(_json(block), local_run="exchange-fed-1", partner="site-a", dp=DP)
    assert answer.evaluation is not None and answer.evaluation["dp"]["mechanism"] == "gaussian"
    assert answer.n_samples == answer.evaluation["n"] == answer.evaluation["score_summary"]["n"]
    assert answer.metrics == {
        k: answer.evaluation[k] for k in ("auc", "pr_auc", "accuracy", "log_loss", "n", "positives")
    }


def test_without_dp_the_evaluation_answer_is_the_exact_block():
    block = _block()
    answer = evaluation_answer(_json(block), local_run="exchange-fed-1", partner="site-a")
    assert answer.evaluation == block and answer.n_samples == block["n"]


def test_a_train_answer_under_dp_drops_its_training_metrics_and_held_out_block():
    kw: dict[str, Any] = dict(
        run_id="fed-1", round_=2, local_run="exchange-fed-1", local_round=3, partner="site-a"
    )
    private, _ = update_answer(_update(), dp=DP, **kw)
    assert private.metrics == {} and private.evaluation is None and private.n_samples == 40
    plain, _ = update_answer(_update(), **kw)
    assert plain.metrics == {"loss": 0.5, "auc": 0.7, "n": 40} and plain.evaluation is not None


# ------------------------------------------------------------------------------------- the site's ledger


@dataclass
class EvalWorld(DPWorld):
    """A site whose trainer answers train jobs (DP-SGD) and evaluations (noisy, as SiteTrainer does)."""

    noisy: bool = True
    #: the DP settings the trainer actually noised with (``None``: the job's)
    noised_with: DPTraining | None = None

    def trainer(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        if job.mode == "train":
            return super().trainer(job, global_weights)
        self.trained.append((job, global_weights))
        dp = (self.noised_with or job.hparams.dp) if self.noisy else None
        return evaluation_answer(_json(_block()), local_run="exchange-fed-1", partner="site-a", dp=dp), None


@pytest.fixture
def eval_world(world: DPWorld) -> EvalWorld:
    return EvalWorld(**{k: getattr(world, k) for k in World.__dataclass_fields__})


def test_an_evaluation_is_charged_and_composes_with_the_training_rounds(eval_world):
    w = eval_world
    w.policy = budget_policy(w.coordinator, epsilon=6.0)
    for round_ in (1, 2):
        assert w.handle(w.post(dp_job(), round=round_), sample_count=count).status is JobStatus.ANSWERED
    outcome = w.handle(w.post(dp_job(mode="evaluate"), round=6), sample_count=count)
    answer = _answer(w, outcome)
    assert answer.evaluation is not None and answer.evaluation["dp"]["noise_multiplier"] == SIGMA_EVAL
    # 2 x sgd(1.0, 32/1200, 38) + GaussianDpEvent(SIGMA_EVAL), composed by the accountant that
    # tests/unit/core/test_privacy_gaussian.py pins to dp_accounting
    planned = privacy.planned_charge(DP, N, 32, 1)
    composed = privacy.epsilon_of([planned, planned, privacy.gaussian_charge(SIGMA_EVAL, **KEY)], DELTA)
    assert answer.budget is not None and answer.budget.epsilon_spent == pytest.approx(composed)
    assert answer.privacy == privacy.gaussian_privacy_charge(SIGMA_EVAL, DELTA)
    assert answer.privacy.epsilon_this_update <= 1.0  # the run's evaluation epsilon
    entries = w.ledger().entries
    assert [(e.key, e.release) for e in entries] == [
        ((RUN, 1), "update"),
        ((RUN, 6), "evaluation"),  # reserved with round 1; the evaluation itself added nothing
        ((RUN, 2), "update"),
    ]
    assert privacy.spent(w.ledger()) == pytest.approx(composed)


def test_an_evaluation_over_budget_is_refused_before_the_trainer_runs(eval_world):
    w = eval_world
    w.policy = budget_policy(w.coordinator, epsilon=0.9)  # one release alone costs the run's epsilon, 1
    outcome = w.handle(w.post(dp_job(mode="evaluate"), round=6), sample_count=count)
    [reason] = _refusal(w, outcome).reasons
    assert reason["code"] == "budget_exhausted"
    assert float(reason["epsilon_asked"]) == pytest.approx(1.0, rel=1e-5)
    assert w.trained == [] and w.ledger().entries == []
    assert outcome.reply is not None and outcome.written == (object_key(outcome.reply),)  # the refusal only


def test_an_evaluation_without_dp_on_a_budgeted_dataset_is_refused(eval_world):
    w = eval_world
    outcome = w.handle(w.post(dp_job(dp=None, mode="evaluate"), round=3), sample_count=count)
    assert [r["code"] for r in _refusal(w, outcome).reasons] == ["privacy_required"]
    assert w.trained == []


@pytest.mark.parametrize(
    "trainer",
    [
        {"noisy": False},
        {"noised_with": DPTraining(noise_multiplier=1.0, delta=DELTA, evaluation_epsilon=2.0)},
    ],
)
def test_an_exact_or_under_noised_evaluation_under_a_dp_job_never_leaves(eval_world, trainer):
    w = eval_world
    w.policy = budget_policy(w.coordinator, epsilon=6.0)
    for name, value in trainer.items():  # forgot the noise, or noised for a larger epsilon than the run's
        setattr(w, name, value)
    with pytest.raises(RuntimeError, match="not the noisy release"):
        w.handle(w.post(dp_job(mode="evaluate"), round=6), sample_count=count)
    assert w.site_writes() == [] and w.ledger().entries == []


def test_a_dp_train_answer_leaves_without_metrics_whatever_the_trainer_returned(world):
    answer = _answer(world, world.handle(world.post(dp_job()), sample_count=count))
    assert answer.metrics == {} and answer.evaluation is None and answer.n_samples == N


def test_without_dp_and_without_a_budget_nothing_changes(eval_world):
    from tests.unit.site.fakes import site_policy
    from tests.unit.site.test_jobs import SITE

    w = eval_world
    w.policy = site_policy(w.coordinator, SITE)
    w.noisy = False
    train = _answer(w, w.handle(w.post(dp_job(dp=None), round=2)))
    assert train.metrics == {"loss": 0.25} and train.update is not None
    answer = _answer(w, w.handle(w.post(dp_job(dp=None, mode="evaluate"), round=3)))
    assert answer.evaluation == _block() and answer.privacy is None and answer.budget is None


def test_the_report_labels_the_held_out_numbers_of_a_dp_run_through_sites_as_noisy():
    from lepton_tasks.core.messages import FinalMetrics, RunPrivacy
    from lepton_tasks.federation.report import _summary
    from tests.unit.federation.metrics_sample import sample_run_metrics

    final = FinalMetrics(per_partner={}, overall={"auc": 0.81, "n": 3012, "method": "score-histogram"})
    dp = RunPrivacy(secure_aggregation=False, dp=DPTraining(noise_multiplier=1.0))
    labels = [str(k) for k, _ in _summary(sample_run_metrics(dp, final=final))]
    assert "overall AUC (score-histogram) (noisy: DP)" in labels and "held-out samples (noisy: DP)" in labels
    off = RunPrivacy(secure_aggregation=False)
    plain = [str(k) for k, _ in _summary(sample_run_metrics(off, final=final))]
    assert "overall AUC (score-histogram)" in plain and not any("noisy" in k for k in plain)


def test_the_approver_reads_that_the_evaluation_leaves_noisy_and_charged():
    from types import SimpleNamespace

    from lepton_tasks.site.training import describe_job

    header = SimpleNamespace(consortium="c", site="s", run_id=RUN, round=3)
    text = describe_job(dp_job(mode="evaluate"), header)
    assert f"Gaussian noise (σ = {SIGMA_EVAL:.4g}, ε = 1 at δ = 1e-05)" in text and "privacy budget" in text
    assert "Gaussian noise" not in describe_job(dp_job(), header)


# ------------------------------------------------------------------------------- the evaluation's reservation


def test_a_site_that_trained_to_its_limit_can_still_evaluate(eval_world):
    """The budget holds two rounds and the evaluation: round 3 is refused, the evaluation still fits."""
    w = eval_world
    planned = privacy.planned_charge(DP, N, 32, 1)
    reserve = privacy.gaussian_charge(SIGMA_EVAL, **KEY)
    limit = privacy.epsilon_of([planned, planned, reserve], DELTA) * 1.001
    w.policy = budget_policy(w.coordinator, epsilon=limit)
    for round_ in (1, 2):
        assert w.handle(w.post(dp_job(), round=round_), sample_count=count).status is JobStatus.ANSWERED
    refused = w.handle(w.post(dp_job(), round=3), sample_count=count)
    [reason] = _refusal(w, refused).reasons
    assert reason["code"] == "budget_exhausted" and float(reason["epsilon_reserved"]) == 0  # in spent already
    before = w.ledger().entries
    outcome = w.handle(w.post(dp_job(mode="evaluate"), round=6), sample_count=count)
    answer = _answer(w, outcome)
    assert answer.budget is not None and answer.budget.epsilon_spent <= limit
    assert w.ledger().entries == before  # charged ahead: the evaluation costs nothing more


def test_an_evaluation_at_another_epsilon_than_the_one_reserved_is_refused(eval_world):
    w = eval_world
    w.policy = budget_policy(w.coordinator, epsilon=6.0)
    assert w.handle(w.post(dp_job(), round=1), sample_count=count).status is JobStatus.ANSWERED
    other = DPTraining(noise_multiplier=1.0, delta=DELTA, evaluation_epsilon=3.0)
    outcome = w.handle(w.post(dp_job(dp=other, mode="evaluate"), round=6), sample_count=count)
    assert [r["code"] for r in _refusal(w, outcome).reasons] == ["privacy_ledger_conflict"]
    assert w.trained[-1][0].mode == "train"  # refused before the trainer ran
