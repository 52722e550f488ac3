"""The site's real ``run_trainer``: a verified round job becomes an answer by training on the site's OWN data.

:func:`lepton_tasks.site.jobs.handle_job` calls ``run_trainer(job, global_weights)`` once the job is
authentic, allowed by the site's policy and approved. :class:`SiteTrainer` is that callable. It never trains
a second way: it lays out, in the site's own ``models`` bucket, a one-partner local run
(:mod:`lepton_tasks.site.local_run`), and then runs the trainer (``python -m lepton_tasks.trainer``, through
:func:`lepton_tasks.site.local_run.trainer_job`) on it:

- ``statistics`` (round 0): no trainer. The site reads its committed drops of the job's dataset
  (:func:`lepton_tasks.ingest.stage.staged_manifests`, each manifest verified with the site's own key by
  :func:`lepton_tasks.adapters.manifest.read_manifest`), keeps the latest drop per inbox file
  (:func:`lepton_tasks.site.local_run.latest_per_source`) staged under the job's contract, and answers the
  sum of their training-split :class:`~lepton_tasks.core.features.SufficientStats` — additive counts and
  sums only: no minimum, maximum or raw category value ever is one of them (see ``core.features``).
- ``train`` (rounds 1..R) and ``evaluate`` (round R+1): the site writes under ``models/<local run>/`` (the
  local run id is :func:`local_run_id` of the coordinator's run id) a one-partner :class:`Plan` (written once
  per run: every round trains on the same drops), ``stats.json`` (the merged statistics the job carries)
  and the job's global weights, then asks the injected :data:`TrainerRunner` to run the trainer, and reads
  its output back:

  =============================  ==============================  =====================================
  exchange job of round ``k``    global weights stored as        trainer runs as / output read from
  =============================  ==============================  =====================================
  ``train``                      ``round-<k>/global.npz``        train, round ``k+1`` →
                                                                 ``round-<k+1>/<partner>.update``
  ``evaluate``                   ``round-<k>/global.npz``        evaluate (the latest global) →
                                                                 ``eval/<partner>.json``
  =============================  ==============================  =====================================

  (The trainer reads round ``j-1``'s global weights when it trains round ``j`` and none in round 1, so the
  site trains one local round later than the exchange round: round 1's job also starts from the
  coordinator's weights.)

The runner is injected so that the site's Airflow passes the Docker-based trainer
(``lepton_airflow.trainer.run_trainer``: a hardened container, or the local runtime; the site DAG,
``dags/lepton_site.py``) and a test may pass :func:`local_runner` (the same trainer as a subprocess).
Whatever the runner, the trainer gets a job that names only this site's partner objects and a token scoped
to its key; no secret passes through here.

When the site cannot answer, it says so (a signed refusal, :class:`~lepton_tasks.site.jobs.CannotAnswer`)
rather than leaving the coordinator to wait for the round's deadline: ``no_usable_data`` when it has no
usable drop (:class:`NoUsableData`, at once: retrying cannot add data), ``trainer_failed`` when the trainer
fails for good — a non-zero exit other than the transient one (4), an update or evaluation missing or not
this job's (at once) — or keeps failing for a transient reason (a service down, exit 4, the runtime
unavailable) until the task's last try (:func:`trainer_refusal`; earlier tries raise, and Airflow retries).
The refusal names the exit code and the kind of the trainer's last error line, never its text (which may
hold a data value or an address); the whole stderr tail stays in the site's task log.

What goes back in the answer: the sample count, the training metrics (aggregates: loss, AUC, counts), the
held-out metric blocks with their score histograms, the DP-SGD charge, and the update's weights (with a
minimal meta: run, round, sample count). Never a row, never a record's value, never a drop's key.

Under differential privacy (the job's ``hparams.dp`` is set) only DP outputs leave:

- ``train``: the update (DP-SGD) and its charge. The training metrics (loss, AUC, counts on the site's
  training rows) and the held-out block of the incoming global model are DROPPED, not noised: each would be a
  release about the site's records every round, charged to the ledger each time (R Gaussian releases for a
  monitoring curve), and the run's held-out quality is measured once, privately, in the evaluation round.
- ``evaluate``: :func:`private_evaluation`. The score histogram is coarsened to :data:`DP_BINS` bins per
  class (:func:`dp_groups`: a fixed, data-independent grouping of the fine bins, 0.25 log-odds units over
  [-8, 8] and one bin per tail: same sensitivity, 31x fewer noisy bins), every bin gets Gaussian noise
  (one held-out record is one count of one bin of one class: L2 sensitivity 1 under add/remove-one),
  counts are rounded but NOT clamped (a bin may be negative: each stays unbiased, and so do the sums the
  coordinator merges), and every number in the answer — n, positives, AUC, PR-AUC, accuracy, log-loss, the
  sample count — is recomputed FROM the noisy histogram (``core.metrics.merge_score_summaries``: metrics
  clipped into their range, none where a noisy total is <= 0). The noise's sigma is
  calibrated from the run's declared evaluation cost (``dp.evaluation_epsilon``, default 1):
  :func:`lepton_tasks.core.privacy.evaluation_sigma`, the smallest sigma whose one
  ``GaussianDpEvent(sigma)`` costs at most that epsilon at the run's delta (sigma = 4.05 for the default
  at delta = 1e-5). Not the DP-SGD sigma: at sigma = 1 the release alone would cost eps = 4.73, and a site
  whose budget DP-SGD nearly spent would drop out of the evaluation. The site's ledger charges it
  (``site.jobs``), and reserves it when the run's train rounds are charged, so a site that trained can
  always evaluate.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from lepton_tasks.core.messages import (
    DPTraining,
    EvalResult,
    HParams,
    Manifest,
    MessageError,
    Plan,
    PlanDrop,
    RoundAnswer,
    RoundJob,
    UpdateMeta,
    dump,
    load,
)

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.outbound_log import OutboundLog
    from lepton_tasks.core.signatures import Signer
    from lepton_tasks.core.site_policy import SitePolicy
    from lepton_tasks.site.jobs import JobOutcome
    from lepton_tasks.site.secagg import SiteExchange
    from lepton_tasks.site.state import SiteState

__all__ = [
    "LOCAL_RUN_PREFIX",
    "JobNotAccepted",
    "NoUsableData",
    "Site",
    "SiteTrainer",
    "SiteTrainingError",
    "TrainerFailed",
    "TrainerRun",
    "TrainerRunner",
    "Verified",
    "answer_job",
    "describe_job",
    "dp_groups",
    "evaluation_answer",
    "job_label",
    "local_run_id",
    "local_runner",
    "private_evaluation",
    "select_drops",
    "site_hparams",
    "site_plan",
    "statistics_answer",
    "take_job",
    "trainer_error_kind",
    "trainer_refusal",
    "update_answer",
    "verify_job",
]

log = logging.getLogger(__name__)

#: a site's local runs for the coordinator's runs are ``exchange-<coordinator run id>`` in its models bucket
LOCAL_RUN_PREFIX: Final = "exchange-"
#: the scalar metrics of an evaluation that go into ``RoundAnswer.metrics``
EVAL_SCALARS: Final = ("auc", "pr_auc", "accuracy", "log_loss", "n", "positives")
#: a score histogram released under DP groups the ``core.metrics.N_BINS`` fine bins (a fixed, data-independent
#: grouping): groups of DP_GROUP_WIDTH fine bins (0.25 log-odds units) over [-DP_LOGIT_RANGE, DP_LOGIT_RANGE],
#: and one group for each tail beyond it (few scores land there; every group, empty or not, adds noise)
DP_GROUP_WIDTH: Final = 16
DP_LOGIT_RANGE: Final = 8.0


class SiteTrainingError(RuntimeError):
    """The job cannot be run at this site as given; running it again cannot help (no retry)."""


class NoUsableData(SiteTrainingError):
    """The site has no verified, committed drop of the job's dataset under the job's contract."""


class BadTrainerOutput(SiteTrainingError):
    """The trainer exited 0 but its output is not this job's update or evaluation (its message names what is
    wrong with identifiers only: it becomes the ``trainer_failed`` refusal's message)."""


#: the trainer's exit code for a transient failure (``lepton_tasks.trainer.__main__.EXIT_TRANSIENT``)
EXIT_TRANSIENT: Final = 4
#: the prefixes of the trainer's own last stderr line (``lepton_tasks.trainer.__main__.main``), kept in a
#: refusal; the text after them is not
_ERROR_KINDS: Final = ("security error", "transient error", "bad job", "error")
#: the prefixes the trainer follows with the exception's class name (``type(exc).__name__: message``)
_TYPED_KINDS: Final = ("transient error", "error")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: a bare traceback's last line names an exception class like these
_ERROR_TYPE = re.compile(r"[A-Z][A-Za-z0-9_]{0,63}(?:Error|Exception|Failure|Timeout|Denied|Down|Exit)")


class TrainerFailed(RuntimeError):
    """A trainer that exited with ``exit_code`` (non-zero). The message (for the task log) holds its last
    stderr lines, secrets scrubbed; ``stderr_tail`` keeps those lines for :meth:`refusal_message`."""

    def __init__(self, message: str, *, exit_code: int, stderr_tail: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr_tail = tuple(stderr_tail)

    @property
    def transient(self) -> bool:
        """Whether a later try may succeed (the trainer's own verdict: a service did not answer)."""
        return self.exit_code == EXIT_TRANSIENT

    def refusal_message(self) -> str:
        """What the site's refusal says about it: the exit code, its meaning and the kind of the trainer's
        last error line (never that line's text: it may hold a data value)."""
        from lepton_tasks.trainer.__main__ import EXIT_CODES

        code = self.exit_code
        signal = -code if code < 0 else code - 128 if code > 128 else None  # subprocess: < 0; Docker: 128 + n
        meaning = EXIT_CODES.get(code) or (f"killed by signal {signal}" if signal else "error")
        kind = next((k for line in reversed(self.stderr_tail) if (k := trainer_error_kind(line))), None)
        detail = f"; its last error: {kind}" if kind else ""
        return f"the trainer exited with code {code} ({meaning}){detail}"


def trainer_error_kind(line: str) -> str | None:
    """The kind of a trainer's stderr line, safe to send: the trainer's own prefix (``error``, ``transient
    error``, ``bad job``, ``security error``) and, after ``error``/``transient error``, the exception class it
    names — ``error: ValueError`` for ``error: ValueError: could not convert 'x7'``; a bare traceback line
    ``SomeError: …`` gives ``SomeError``. ``None`` for any other line (a log line, a traceback frame). The
    text after the kind is never kept: it may hold a data value, an address or a path."""
    text = line.strip()
    for prefix in _ERROR_KINDS:
        rest = text[len(prefix) :] if text.startswith(prefix) else None
        if rest is None:
            continue
        if rest.startswith(" (") and ")" in rest:  # "transient error (a service did not answer; retry): …"
            rest = rest.split(")", 1)[1]
        if not rest.startswith(":"):
            continue
        if prefix in _TYPED_KINDS and _IDENTIFIER.fullmatch(name := rest[1:].split(":", 1)[0].strip()):
            return f"{prefix}: {name}"
        return prefix
    head = text.split(":", 1)[0]
    return head if ":" in text and _ERROR_TYPE.fullmatch(head) else None


def trainer_refusal(exc: BaseException, *, last_try: bool) -> str | None:
    """The ``trainer_failed`` refusal message for a trainer run that raised ``exc``, or ``None``: raise it
    and let Airflow retry the task. Transient — the trainer's exit 4, a service its task needs down
    (``ServicesDown``), or the runtime failing otherwise (Docker, a timeout) — refuses only on the task's
    last try; any other exit code refuses at once (retrying the same job on the same data cannot help).
    The message names what failed by kind, code and service, never by an exception's text."""
    from lepton_tasks.adapters.health import ServicesDown
    from lepton_tasks.ops.images import StaleImageError

    if _caused_by(exc, StaleImageError):  # the site's operator must rebuild it: no retry will
        return "the site's trainer image is older than its trainer code (stale image); not retried"
    if isinstance(exc, TrainerFailed):
        if not exc.transient:
            return exc.refusal_message()
        return exc.refusal_message() + " on the task's last try" if last_try else None
    if not last_try:
        return None
    if isinstance(exc, ServicesDown):
        down = ", ".join(sorted({h.service for h in exc.down})) or "a service"
        return f"the trainer could not be started: {down} did not answer, up to the task's last try"
    return f"the trainer could not be run ({type(exc).__name__}), up to the task's last try"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception it was raised from (``__cause__`` chain) is a ``kind``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__
    return False


@dataclass(frozen=True)
class TrainerRun:
    """One trainer execution, in the trainer's own terms (``lepton_airflow.trainer.run_trainer``'s
    parameters): the local run id whose plan the job is built from, the partner, mode and round."""

    run_id: str
    partner: str
    mode: Literal["train", "evaluate"]
    round_number: int


#: runs the trainer for a :class:`TrainerRun` and returns once its output is written; raises if it failed
TrainerRunner = Callable[[TrainerRun], None]


def local_run_id(run_id: str) -> str:
    """The site's local run id for the coordinator's run ``run_id`` (where its plan and outputs live)."""
    return f"{LOCAL_RUN_PREFIX}{run_id}"


# --------------------------------------------------------------------------------------------- pure parts


def select_drops(manifests: Mapping[str, Manifest], contract_sha256: str) -> tuple[list[str], dict[str, str]]:
    """Of one partner's verified manifests (key → manifest), the keys that count for a job under the contract
    ``contract_sha256``: the latest drop per inbox file, staged under that contract. Returns ``(keys,
    {left-out key: why})``."""
    from lepton_tasks.site.local_run import latest_per_source

    current, superseded = latest_per_source(dict(manifests))
    excluded = {key: f"superseded by {by}" for key, by in superseded.items()}
    keep = []
    for key in current:
        if manifests[key].contract_sha256 != contract_sha256:
            excluded[key] = (
                f"staged under contract {manifests[key].contract} ({manifests[key].contract_sha256[:12]}…), "
                f"not the job's ({contract_sha256[:12]}…)"
            )
        else:
            keep.append(key)
    return keep, excluded


def statistics_answer(manifests: Iterable[Manifest]) -> RoundAnswer:
    """The answer to a ``statistics`` job: the sum of the drops' training-split statistics (additive counts
    and sums; never a minimum, a maximum or a raw category value). :class:`NoUsableData` when empty.

    These are EXACT; under a DP job they never leave as such: ``site.jobs`` replaces them with one Gaussian
    release (``federation.private_statistics.noisy_statistics``) before the answer is charged, held for
    secure aggregation or written."""
    from lepton_tasks.core.features import merge

    stats = [m.statistics_train for m in manifests]
    if not stats:
        raise NoUsableData("no committed drop to compute statistics from")
    merged = merge(stats)
    return RoundAnswer(mode="statistics", n_samples=merged.rows, statistics=merged)


def site_hparams(job: RoundJob) -> HParams:
    """The local run's :class:`HParams` that make ``trainer_job`` hand the trainer the job's hparams."""
    hp, dp = job.hparams, job.hparams.dp
    return HParams(
        rounds=job.rounds,
        local_epochs=hp.local_epochs,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        strategy=job.strategy,
        min_partners=1,
        seed=hp.seed,
        fedprox_mu=hp.fedprox_mu,
        dp_noise_multiplier=dp.noise_multiplier if dp is not None else None,
        dp_l2_clip=dp.l2_clip if dp is not None else 1.0,
        dp_delta=dp.delta if dp is not None else 1e-5,
    )


def site_plan(
    job: RoundJob,
    *,
    run_id: str,
    partner: str,
    manifests: Mapping[str, Manifest],
    feature_names: list[str],
) -> Plan:
    """The one-partner plan of the site's local run ``run_id`` over ``manifests`` (already selected)."""
    drops = [PlanDrop.of(key, m) for key, m in sorted(manifests.items())]
    if not drops:
        raise NoUsableData(f"no committed {job.dataset} drop of {partner} under the job's contract")
    return Plan(
        run_id=run_id,
        dataset=job.dataset,
        contract=drops[0].contract,
        contract_sha256=job.contract_sha256,
        partners=[partner],
        drops={partner: drops},
        hparams=site_hparams(job),
        feature_names=feature_names,
    )


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float, type(None))) and not isinstance(v, bool) and k != "score_summary"
    }


def update_answer(
    raw: bytes,
    *,
    run_id: str,
    round_: int,
    local_run: str,
    local_round: int,
    partner: str,
    dp: DPTraining | None = None,
) -> tuple[RoundAnswer, bytes]:
    """The answer to a ``train`` job from the trainer's update file (``weights + UpdateMeta``).

    The update that leaves the site carries the weights and a minimal meta (the coordinator's run and round,
    the sample count); the trainer's meta (drop hashes, partner name) stays here. The metrics, the held-out
    block of the incoming global model (with its score histogram) and the DP-SGD charge go in the answer —
    except under ``dp``, where the metrics and the held-out block are left out (module docstring).
    :class:`BadTrainerOutput` when the file is not this run's, round's and partner's update.
    """
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.messages import ExchangeUpdateMeta

    try:
        arrays, raw_meta = wio.loads(raw)
        meta = load(UpdateMeta, raw_meta, where=f"the trainer's update of {local_run} round {local_round}")
    except (ValueError, MessageError) as exc:
        log.error("the trainer's update of %s round %s is unreadable: %s", local_run, local_round, exc)
        raise BadTrainerOutput(f"the trainer's output is not an update ({type(exc).__name__})") from None
    if (meta.run_id, meta.round, meta.partner) != (local_run, local_round, partner):
        raise BadTrainerOutput(
            f"the trainer's update is for {meta.partner}/{meta.run_id}/round {meta.round}, not "
            f"{partner}/{local_run}/round {local_round}"
        )
    fields: dict[str, Any] = {"mode": "train", "n_samples": meta.n_samples}
    if dp is None:
        fields.update(metrics=_scalars(meta.metrics), evaluation=meta.global_prev_holdout)
    if meta.privacy is not None and "privacy" in RoundAnswer.model_fields:
        fields["privacy"] = meta.privacy
    out_meta = ExchangeUpdateMeta(run_id=run_id, round=round_, n_samples=meta.n_samples)
    update = wio.dumps(arrays, dump(out_meta))
    return RoundAnswer(**fields), update


def _dense(pairs: Any) -> np.ndarray:
    from lepton_tasks.core.metrics import N_BINS

    out = np.zeros(N_BINS, np.int64)
    for i, c in pairs:
        out[int(i)] += int(c)
    return out


def dp_groups() -> tuple[np.ndarray, np.ndarray]:
    """``(group of each fine bin, the fine bin where each group's released count sits)``: the grouping of a
    score histogram released under DP (:data:`DP_GROUP_WIDTH`, :data:`DP_LOGIT_RANGE`). A group's count sits
    at its middle fine bin; a tail's at the fine bin next to the range's edge."""
    from lepton_tasks.core.metrics import LOGIT_RANGE, N_BINS

    lo = round((LOGIT_RANGE - DP_LOGIT_RANGE) / (2 * LOGIT_RANGE) * N_BINS)
    hi = N_BINS - lo
    inner = (hi - lo) // DP_GROUP_WIDTH
    fine = np.arange(N_BINS)
    group = np.where(fine < lo, 0, np.where(fine >= hi, inner + 1, 1 + (fine - lo) // DP_GROUP_WIDTH))
    where = np.array([lo - 1, *(lo + k * DP_GROUP_WIDTH + DP_GROUP_WIDTH // 2 for k in range(inner)), hi])
    return group, where


#: groups per class of a score histogram released under DP (64 of 0.25 log-odds units and two tails)
DP_BINS: Final = int(dp_groups()[1].size)


def _regroup(counts: np.ndarray) -> np.ndarray:
    """Fine-bin counts summed into the :data:`DP_BINS` groups of :func:`dp_groups`."""
    group, _ = dp_groups()
    return np.asarray(np.bincount(group, weights=counts, minlength=DP_BINS).round(), dtype=np.int64)


def _spread(grouped: np.ndarray) -> np.ndarray:
    """Group counts back on the fine grid, each at its group's fine bin (:func:`dp_groups`)."""
    from lepton_tasks.core.metrics import N_BINS

    out = np.zeros(N_BINS, np.int64)
    out[dp_groups()[1]] = grouped
    return out


def private_evaluation(block: Mapping[str, Any], dp: DPTraining) -> dict[str, Any]:
    """The held-out metric ``block`` as it may leave under ``dp``: its score histogram regrouped to
    :data:`DP_BINS` bins per class, Gaussian noise on every bin
    (:func:`lepton_tasks.core.privacy.noisy_counts`) of std sigma =
    :func:`~lepton_tasks.core.privacy.evaluation_sigma` — the smallest whose one release costs at most the
    run's ``dp.evaluation_epsilon``, NOT the DP-SGD sigma: at sigma = 1 this one release alone would cost
    eps = 4.73 (delta = 1e-5), and a site whose budget DP-SGD nearly spent could not evaluate — and the
    metrics recomputed from that noisy histogram only; nothing else of ``block`` is kept. The noisy counts
    leave signed, unclamped (``"noisy": true`` in the summary): clamping each bin at 0 would bias the AUC
    toward 0.5 (by 0.05 at 3,000 held-out rows and sigma 4.05, docs/benchmarks.md); the metrics computed
    from them are clipped into their range instead. A noisy total below 0 reads ``n`` = 0. ``dp`` records the
    mechanism (the site checks it before the answer leaves). :class:`BadTrainerOutput` when the block has no
    usable score histogram."""
    from lepton_tasks.core import metrics as m
    from lepton_tasks.core.privacy import evaluation_sigma, noisy_counts

    summary = block.get("score_summary")
    if (
        not isinstance(summary, Mapping)
        or summary.get("kind") != "score-histogram"
        or summary.get("bins") != m.N_BINS
        or summary.get("logit_range") != m.LOGIT_RANGE
    ):
        raise BadTrainerOutput("the trainer's evaluation has no score histogram to release under DP")
    try:
        pos, neg = _dense(summary["pos"]), _dense(summary["neg"])
        threshold = float(summary.get("threshold", m.THRESHOLD))
    except (KeyError, TypeError, ValueError, IndexError):
        raise BadTrainerOutput("the trainer's score histogram is malformed") from None
    sigma = evaluation_sigma(dp)
    noisy = m.summary_from_counts(
        _spread(noisy_counts(_regroup(pos), sigma)),
        _spread(noisy_counts(_regroup(neg), sigma)),
        threshold=threshold,
        noisy=True,
    )
    merged = m.merge_score_summaries([noisy])
    note = (
        f"differentially private: Gaussian noise (sigma {sigma:g}) on a {DP_BINS}-bin score histogram per "
        "class, counts left signed (unclamped, unbiased); every metric here is computed from the noisy "
        "histogram and clipped into its range"
    )
    return {
        **{k: merged[k] for k in m.METRIC_KEYS},
        "notes": [*merged["notes"], note],
        "score_summary": noisy,
        "dp": {
            "mechanism": "gaussian",
            "noise_multiplier": sigma,
            "sensitivity": 1.0,
            "bins_per_class": DP_BINS,
            "delta": dp.delta,
            "epsilon": dp.evaluation_epsilon,
        },
    }


def evaluation_answer(
    raw: bytes | dict[str, Any], *, local_run: str, partner: str, dp: DPTraining | None = None
) -> RoundAnswer:
    """The answer to an ``evaluate`` job from the trainer's :class:`EvalResult`: the global model's held-out
    metric block (with its score histogram) and its scalars; the local-only models' blocks stay here. Under
    ``dp`` the block is :func:`private_evaluation`'s and the sample count its noisy ``n``."""
    try:
        result = load(EvalResult, raw, where=f"the trainer's evaluation of {local_run}")
    except MessageError as exc:
        log.error("the trainer's evaluation of %s is unreadable: %s", local_run, exc)
        raise BadTrainerOutput(f"the trainer's output is not an evaluation ({type(exc).__name__})") from None
    if (result.partner, result.run_id) != (partner, local_run):
        raise BadTrainerOutput(
            f"the trainer's evaluation is for {result.partner}/{result.run_id}, not {partner}/{local_run}"
        )
    block = dict(result.global_) if dp is None else private_evaluation(result.global_, dp)
    return RoundAnswer(
        mode="evaluate",
        n_samples=result.rows.holdout if dp is None else int(block["n"]),
        metrics=_scalars({k: block.get(k) for k in EVAL_SCALARS if k in block}),
        evaluation=block,
    )


# ------------------------------------------------------------------------------------------- the trainer


class SiteTrainer:
    """``run_trainer`` for :func:`~lepton_tasks.site.jobs.handle_job` (see the module docstring).

    ``settings``/``storage``/``vault``: the SITE's own (its staging and models buckets, its Vault with the
    partner's transit key). ``partner``: the partner whose staged data the site trains. ``run_id`` and
    ``round_``: the exchange job's run and round (from the key the job was read from: ``handle_job`` has
    checked that the signed header names the same). ``runner``: executes the trainer. ``last_try``: whether
    this is the task's last try (a transient trainer failure then becomes a refusal, see
    :func:`trainer_refusal`).
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        vault: Vault,
        *,
        partner: str,
        run_id: str,
        round_: int,
        runner: TrainerRunner,
        last_try: bool = True,
    ) -> None:
        self.settings, self.storage, self.vault = settings, storage, vault
        self.partner, self.run_id, self.round = partner, run_id, round_
        self.runner, self.last_try = runner, last_try
        self.local_run = local_run_id(run_id)

    @classmethod
    def for_key(
        cls,
        settings: Settings,
        storage: Storage,
        vault: Vault,
        *,
        partner: str,
        key: str,
        runner: TrainerRunner,
        last_try: bool = True,
    ) -> SiteTrainer:
        """The trainer for the job stored at exchange key ``key`` (``jobs/<run>/<round>/<id>.json``)."""
        from lepton_tasks.core.exchange import parse_object_key

        parts = parse_object_key(key)
        return cls(
            settings,
            storage,
            vault,
            partner=partner,
            run_id=parts.run_id,
            round_=parts.round,
            runner=runner,
            last_try=last_try,
        )

    def __call__(self, job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        """The answer to ``job`` and its update's bytes; :class:`~lepton_tasks.site.jobs.CannotAnswer` when
        the site has no usable data or the trainer failed for good (the site then refuses the job)."""
        from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode

        self._check_contract(job)
        try:
            manifests = self._manifests(job)
        except NoUsableData as exc:
            raise CannotAnswer(SiteRefusalCode.NO_USABLE_DATA, str(exc), field="dataset") from exc
        if job.mode == "statistics":
            answer = statistics_answer(manifests.values())  # manifests is not empty: no NoUsableData
            log.info("site %s: statistics of %d drop(s)", self.partner, len(manifests))
            return answer, None
        if global_weights is None:
            raise SiteTrainingError(f"a {job.mode} job needs global weights; this one names none")
        self._prepare(job, manifests, global_weights)
        if job.mode == "train":
            return self._train(job.hparams.dp)
        return self._evaluate(job.hparams.dp), None

    # steps ------------------------------------------------------------------------------------------------
    def _check_contract(self, job: RoundJob) -> None:
        from lepton_tasks.core.contracts import load_contract

        try:
            local = load_contract(job.dataset)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise SiteTrainingError(f"this site has no contract for {job.dataset}: {exc}") from None
        if local.sha256 != job.contract_sha256:
            raise SiteTrainingError(
                f"the job's {job.dataset} contract ({job.contract_sha256[:12]}…) is not this site's "
                f"({local.version_tag}, {local.sha256[:12]}…)"
            )

    def _manifests(self, job: RoundJob) -> dict[str, Manifest]:
        """The partner's verified manifests of the job's dataset that count for this job."""
        from lepton_tasks.adapters.manifest import ManifestError, read_manifest
        from lepton_tasks.ingest.stage import staged_manifests

        found = staged_manifests(self.storage, self.settings, job.dataset, [self.partner])
        keys = found.get(self.partner, [])
        verified: dict[str, Manifest] = {}
        for key in keys:
            try:
                verified[key] = read_manifest(
                    self.storage, self.settings, self.vault, self.partner, key, job.dataset
                )
            except ManifestError as exc:  # a tampered manifest is left out, loudly (never trained on)
                log.error("site %s: leaving out %s: %s", self.partner, key, exc)
        selected, excluded = select_drops(verified, job.contract_sha256)
        for key, why in excluded.items():
            log.warning("site %s: leaving out %s: %s", self.partner, key, why)
        if not selected:
            raise NoUsableData(
                f"{self.partner} has no verified, committed {job.dataset} drop under the job's contract "
                f"({len(keys)} staged, {len(keys) - len(verified)} failed verification)"
            )
        return {k: verified[k] for k in selected}

    def _prefix(self) -> str:
        from lepton_tasks.site.local_run import run_prefix

        return run_prefix(self.local_run)

    def _prepare(self, job: RoundJob, manifests: dict[str, Manifest], global_weights: bytes) -> None:
        """Write the local plan (once per run), ``stats.json`` and the job's global weights."""
        from lepton_tasks.core.contracts import load_contract
        from lepton_tasks.core.features import GlobalStats, feature_names
        from lepton_tasks.site.local_run import plan_key, read_plan

        stats: SufficientStats | None = job.statistics
        if stats is None:
            raise SiteTrainingError(f"a {job.mode} job must carry the merged statistics; this one does not")
        contract = load_contract(job.dataset)
        names = feature_names(contract, GlobalStats.from_stats(stats, contract))
        if job.feature_names and list(job.feature_names) != names:
            raise SiteTrainingError(
                f"the job's feature names ({len(job.feature_names)}) are not the ones its statistics give "
                f"here ({len(names)}): the model would not match the global weights"
            )
        bucket, prefix = self.settings.models_bucket, self._prefix()
        if self.storage.exists(bucket, plan_key(self.local_run)):
            plan = read_plan(self.storage, self.settings, self.local_run)
            if (plan.dataset, plan.contract_sha256, plan.partners) != (
                job.dataset,
                job.contract_sha256,
                [self.partner],
            ):
                raise SiteTrainingError(
                    f"the local run {self.local_run} was planned for {plan.partners}/{plan.dataset} "
                    f"({plan.contract_sha256[:12]}…), not for this job"
                )
        else:
            plan = site_plan(
                job, run_id=self.local_run, partner=self.partner, manifests=manifests, feature_names=names
            )
            self.storage.put_json(bucket, plan_key(self.local_run), dump(plan))
        self.storage.put_json(bucket, prefix + "stats.json", stats.model_dump(mode="json"))
        self.storage.put_bytes(bucket, f"{prefix}round-{self.round}/global.npz", global_weights)

    def _run(self, mode: Literal["train", "evaluate"], round_number: int, output: str) -> bytes:
        """Run the trainer and read ``output`` back; a failure the site refuses for (see
        :func:`trainer_refusal`) becomes :class:`~lepton_tasks.site.jobs.CannotAnswer`, others raise."""
        from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode

        bucket = self.settings.models_bucket
        if self.storage.exists(bucket, output):
            self.storage.remove(bucket, output)  # a retry never reads an earlier try's output
        try:
            self.runner(TrainerRun(self.local_run, self.partner, mode, round_number))
        except Exception as exc:  # classified: a refusal, or raised again for Airflow to retry
            message = trainer_refusal(exc, last_try=self.last_try)
            if message is None:
                raise
            log.error("site %s: %s: %s", self.partner, message, exc)
            raise CannotAnswer(SiteRefusalCode.TRAINER_FAILED, message, field="trainer") from exc
        if not self.storage.exists(bucket, output):
            what = "update" if mode == "train" else "evaluation"
            raise CannotAnswer(
                SiteRefusalCode.TRAINER_FAILED,
                f"the trainer exited with code 0 but wrote no {what}",
                field="trainer",
            )
        return self.storage.get_bytes(bucket, output)

    def _train(self, dp: DPTraining | None = None) -> tuple[RoundAnswer, bytes]:
        from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode

        local_round = self.round + 1
        raw = self._run("train", local_round, f"{self._prefix()}round-{local_round}/{self.partner}.update")
        try:
            return update_answer(
                raw,
                run_id=self.run_id,
                round_=self.round,
                local_run=self.local_run,
                local_round=local_round,
                partner=self.partner,
                dp=dp,
            )
        except BadTrainerOutput as exc:
            raise CannotAnswer(SiteRefusalCode.TRAINER_FAILED, str(exc), field="trainer") from exc

    def _evaluate(self, dp: DPTraining | None = None) -> RoundAnswer:
        from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode

        raw = self._run("evaluate", 0, f"{self._prefix()}eval/{self.partner}.json")
        try:
            return evaluation_answer(raw, local_run=self.local_run, partner=self.partner, dp=dp)
        except BadTrainerOutput as exc:
            raise CannotAnswer(SiteRefusalCode.TRAINER_FAILED, str(exc), field="trainer") from exc


# ------------------------------------------------------------------------------------- the local runtime


def local_runner(
    settings: Settings, storage: Storage, vault: Vault, *, timeout: timedelta = timedelta(hours=1)
) -> TrainerRunner:
    """A :data:`TrainerRunner` that runs the trainer as a subprocess of this process (the local
    runtime): the job is :func:`~lepton_tasks.site.local_run.trainer_job`'s (presigned URLs for this
    partner's objects, a token scoped to its key), passed in the environment only; the subprocess gets no
    S3 or Vault credential of ours. For tests and machines without Docker; the site DAG uses
    ``lepton_airflow.trainer.trainer_runner`` (a hardened container)."""

    def run(req: TrainerRun) -> None:
        from lepton_tasks.site.local_run import trainer_job

        job = trainer_job(
            settings,
            storage,
            vault,
            run_id=req.run_id,
            partner=req.partner,
            mode=req.mode,
            round_number=req.round_number,
            ttl=timeout,
        )
        private = ("AIRFLOW_CONN_", "LEPTON_", "VAULT_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(private)}
        env.update({"LEPTON_JOB": job.model_dump_json(), "TF_CPP_MIN_LOG_LEVEL": "2"})
        args = ["--partner", req.partner, "--mode", req.mode, "--round", str(req.round_number)]
        proc = subprocess.run(
            [sys.executable, "-m", "lepton_tasks.trainer", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout.total_seconds(),
        )
        if proc.returncode != 0:
            lines = proc.stderr.splitlines()[-20:]
            raise TrainerFailed(
                f"the trainer for {req.partner} exited with {proc.returncode}:\n" + "\n".join(lines),
                exit_code=proc.returncode,
                stderr_tail=lines,
            )

    return run


# ------------------------------------------------------------------- a job at the site (the DAG's tasks)


class JobNotAccepted(RuntimeError):
    """The site rejected the job (forged, tampered, replayed, moved: nothing sent) or refused it (a signed
    refusal was sent). Permanent: the same job never becomes acceptable by retrying."""

    def __init__(self, message: str, outcome: JobOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class _ReadyToTrain(Exception):
    """Raised by the probe trainer of :func:`verify_job`: everything before training passed."""


@dataclass(frozen=True)
class Site:
    """What a site's job task needs, from the site's files (:class:`~lepton_tasks.site.enrollment.SiteFiles`)
    and its own settings and Vault: the exchange client (the bundle's bucket-scoped credentials), the policy,
    the state, the outbound log, the signer (the site's key in its Vault) and the site's staging/models."""

    settings: Settings
    vault: Vault
    storage: Storage  # the site's own staging + models
    exchange: Storage  # the site's exchange bucket only
    bucket: str
    policy: SitePolicy
    state: SiteState
    outbound_log: OutboundLog
    signer: Signer
    partner: str
    #: its secure-aggregation context (``None``: no at-rest key for it: the site refuses secure jobs)
    secagg: SiteExchange | None = None

    @classmethod
    def open(cls, settings: Settings, vault: Vault) -> Site:
        from lepton_tasks.adapters.signing import TransitSigner
        from lepton_tasks.adapters.storage import Storage
        from lepton_tasks.core.outbound_log import OutboundLog
        from lepton_tasks.core.site_policy import load_policy
        from lepton_tasks.federation.enrollment import read_bundle
        from lepton_tasks.site.enrollment import (
            SiteFiles,
            default_key_name,
            exchange_storage,
            secagg_key_name,
        )
        from lepton_tasks.site.secagg import SiteExchange, VaultSecretBox
        from lepton_tasks.site.state import SiteState

        files = SiteFiles(settings.site_dir)
        bundle = read_bundle(files.bundle)
        policy = load_policy(files.policy)
        if (bundle.site, bundle.consortium) != (policy.site, policy.consortium):
            raise SiteTrainingError(
                f"{files.bundle} is site {bundle.site!r} of {bundle.consortium!r} but {files.policy} is "
                f"{policy.site!r} of {policy.consortium!r}"
            )
        exchange = exchange_storage(bundle)
        outbound_log = OutboundLog(files.outbound_log)
        signer = TransitSigner.from_vault(vault, settings.site_key_name or default_key_name(policy.site))
        box_key = secagg_key_name(policy.site, settings.key_prefix)
        secagg = None
        if _secagg_key_usable(vault, box_key):  # created by `lepton site import` (enrollment_cli.set_up_site)
            secagg = SiteExchange.from_policy(
                policy,
                storage=exchange,
                bucket=bundle.bucket,
                signer=signer,
                outbound_log=outbound_log,
                box=VaultSecretBox(vault.client, box_key, transit_mount=vault.transit_mount),
                state_dir=files.root,
            )
        return cls(
            settings=settings,
            vault=vault,
            storage=Storage.from_settings(settings),
            exchange=exchange,
            bucket=bundle.bucket,
            policy=policy,
            state=SiteState(files.state),
            outbound_log=outbound_log,
            signer=signer,
            partner=settings.site_partner or policy.site,
            secagg=secagg,
        )

    def trainer(self, key: str, runner: TrainerRunner, *, last_try: bool = True) -> SiteTrainer:
        return SiteTrainer.for_key(
            self.settings,
            self.storage,
            self.vault,
            partner=self.partner,
            key=key,
            runner=runner,
            last_try=last_try,
        )

    def sample_count(self, job: RoundJob) -> int:
        """The training rows of the drops this site would train a job on (for a privacy budget check);
        :class:`~lepton_tasks.site.jobs.CannotAnswer` (``no_usable_data``) when there are none."""
        from lepton_tasks.site.jobs import CannotAnswer, SiteRefusalCode

        probe = SiteTrainer(
            self.settings, self.storage, self.vault, partner=self.partner, run_id="-", round_=0, runner=_never
        )
        try:
            manifests = probe._manifests(job)
        except NoUsableData as exc:
            raise CannotAnswer(SiteRefusalCode.NO_USABLE_DATA, str(exc), field="dataset") from exc
        return sum(m.rows.train for m in manifests.values())

    def handle(self, key: str, *, run_trainer: Any, approved: bool | None) -> JobOutcome:
        from lepton_tasks.site.jobs import handle_job

        raw = self.exchange.get_bytes(self.bucket, key)  # StorageError: transient, the task retries
        return handle_job(
            raw,
            key=key,
            policy=self.policy,
            state=self.state,
            run_trainer=run_trainer,
            signer=self.signer,
            storage=self.exchange,
            bucket=self.bucket,
            outbound_log=self.outbound_log,
            approved=approved,
            sample_count=self.sample_count,
            secagg=self.secagg,
        )


def _secagg_key_usable(vault: Vault, name: str) -> bool:
    """Whether the site's secure-aggregation key exists and this Airflow's token may see it; when not, the
    site refuses secure jobs (``secure_aggregation_unavailable``) and the log says why."""
    import hvac.exceptions

    try:
        if vault.key_exists(name):
            return True
        why = "does not exist (run `lepton site import` again to create it)"
    except hvac.exceptions.Forbidden:
        why = "is not readable with this Airflow's Vault token"
    log.warning("secure aggregation unavailable at this site: transit key %s %s", name, why)
    return False


def _never(req: TrainerRun) -> None:
    raise AssertionError("sample_count never runs a trainer")


def job_label(key: str) -> str:
    """How the site's grid names the job at ``key``: ``<run> round <k>``."""
    from lepton_tasks.core.exchange import parse_object_key

    try:
        parts = parse_object_key(key)
    except ValueError:
        return key
    return f"{parts.run_id} round {parts.round}"


def _evaluation_sigma(dp: DPTraining) -> float:
    from lepton_tasks.core.privacy import evaluation_sigma

    return evaluation_sigma(dp)


def describe_job(job: RoundJob, header: Any) -> str:
    """What the site's approver reads (Markdown): who asks what of which data, under which terms."""
    dp = job.hparams.dp
    lines = [
        f"**{header.consortium}** asks site **{header.site}** for a **{job.mode}** job",
        f"- run `{header.run_id}`, round {header.round} of {job.rounds} (strategy {job.strategy}, "
        f"at least {job.min_partners} partners)",
        f"- dataset **{job.dataset}**, contract sha256 `{job.contract_sha256[:16]}…`",
        f"- local epochs {job.hparams.local_epochs}, batch size {job.hparams.batch_size}, "
        f"learning rate {job.hparams.learning_rate}",
        "- differential privacy: "
        + (f"DP-SGD, noise multiplier {dp.noise_multiplier}, clip {dp.l2_clip}" if dp else "none"),
        *(
            [
                "- the held-out score histogram leaves with Gaussian noise "
                f"(σ = {_evaluation_sigma(dp):.4g}, ε = {dp.evaluation_epsilon:g} at δ = {dp.delta:g}), "
                "charged to the site's privacy budget; its metrics are computed from the noisy histogram"
            ]
            if dp is not None and job.mode == "evaluate"
            else []
        ),
        *(
            [
                f"- the run's evaluation (ε = {dp.evaluation_epsilon:g}) is reserved in the site's privacy "
                "budget with this run's training, so that the site can evaluate what it trained"
            ]
            if dp is not None and job.mode == "train"
            else []
        ),
        f"- secure aggregation: {'yes' if job.secure_aggregation else 'no'}",
        "",
        "Approve: the site trains on its own staged data and sends a signed update (weights, sample count, "
        "metrics; never rows). Reject: the site sends a signed refusal.",
    ]
    return "\n".join(lines)


def _not_accepted(outcome: JobOutcome) -> JobNotAccepted:
    from lepton_tasks.site.jobs import JobStatus

    if outcome.status is JobStatus.REJECTED:
        r = outcome.rejection or {}
        return JobNotAccepted(
            f"job {outcome.key} REJECTED ({r.get('reason_code')}, {r.get('field')}): {r.get('message')}; "
            "nothing was sent to the coordinator",
            outcome,
        )
    reasons = "; ".join(f"{r['code']} ({r['field']}): {r['message']}" for r in outcome.reasons)
    return JobNotAccepted(f"job {outcome.key} REFUSED, signed refusal sent: {reasons}", outcome)


@dataclass(frozen=True)
class Verified:
    """What :func:`verify_job` found: the job is ``ready`` (train now) or ``waiting`` for a human."""

    key: str
    label: str
    status: Literal["ready", "waiting"]
    #: when a waiting job is refused for want of a decision (ISO 8601, UTC)
    deadline: str | None = None
    #: the job, for the approver (Markdown)
    description: str = ""

    def to_dict(self) -> dict[str, str | None]:
        return {
            "key": self.key,
            "label": self.label,
            "status": self.status,
            "deadline": self.deadline,
            "description": self.description,
        }


def verify_job(site: Site, key: str) -> Verified:
    """Authenticate and check the job at ``key`` without training it: ``handle_job`` with a probe trainer
    that stops at the training step (nothing is written to the site's state for a job that passed).

    A forged, tampered, replayed or moved job (REJECTED: nothing is sent) and a job the policy refuses
    (REFUSED: the signed refusal is sent right here) raise :class:`JobNotAccepted`.
    """
    from lepton_tasks.site.jobs import JobStatus

    def probe(job: RoundJob, global_weights: bytes | None) -> tuple[RoundAnswer, bytes | None]:
        raise _ReadyToTrain

    try:
        outcome = site.handle(key, run_trainer=probe, approved=None)
    except _ReadyToTrain:
        return Verified(key, job_label(key), "ready")
    if outcome.status is JobStatus.WAITING:
        assert outcome.job is not None and outcome.header is not None
        deadline = outcome.approval_deadline.isoformat() if outcome.approval_deadline else None
        return Verified(key, job_label(key), "waiting", deadline, describe_job(outcome.job, outcome.header))
    if outcome.status is JobStatus.ANSWERED:  # pragma: no cover - the probe never answers
        raise AssertionError(f"{key}: answered without training")
    raise _not_accepted(outcome)


def answer_job(
    site: Site, key: str, *, approved: bool | None, runner: TrainerRunner, last_try: bool = True
) -> JobOutcome:
    """Handle the job at ``key`` for good: train with ``runner`` on the site's data and send the signed
    answer, or send the signed refusal (the approver declined, the deadline passed). A job that is now
    rejected or refused for another reason — no usable data, the trainer failed for good — raises
    :class:`JobNotAccepted` (the refusal is sent); one still waiting for its approver raises
    :class:`SiteTrainingError`. ``last_try``: the task's last try (see :func:`trainer_refusal`)."""
    from lepton_tasks.site.jobs import JobStatus, SiteRefusalCode

    outcome = site.handle(key, run_trainer=site.trainer(key, runner, last_try=last_try), approved=approved)
    if outcome.status is JobStatus.ANSWERED:
        return outcome
    if outcome.status is JobStatus.WAITING:
        raise SiteTrainingError(
            f"job {key} still waits for the site's approval (until {outcome.approval_deadline})"
        )
    if outcome.status is JobStatus.REFUSED and [r["code"] for r in outcome.reasons] == [
        SiteRefusalCode.APPROVAL_DENIED.value
    ]:
        return outcome  # the approver's decision, carried out: not a failure
    raise _not_accepted(outcome)


def take_job(site: Site, key: str, *, runner: TrainerRunner, last_try: bool = True) -> JobOutcome | Verified:
    """Verify the job at ``key`` and, when the site's policy needs no approval for it, train and answer it in
    the same pass (one read and one verification of the job; no task in between on the round's critical
    path). Returns the ANSWERED outcome, or a ``waiting`` :class:`Verified` for a job that waits for the
    site's approver (nothing trained: :func:`answer_job` takes it on once decided). Raises like
    :func:`answer_job`: :class:`JobNotAccepted` for a rejected or refused job (nothing sent, or the signed
    refusal sent), the runner's exception for a transient trainer failure before the last try."""
    from lepton_tasks.site.jobs import JobStatus

    outcome = site.handle(key, run_trainer=site.trainer(key, runner, last_try=last_try), approved=None)
    if outcome.status is JobStatus.ANSWERED:
        return outcome
    if outcome.secagg is not None and outcome.status is JobStatus.WAITING:
        # a phase job its phase did not find again (e.g. listed before it was readable): the task retries
        raise RuntimeError(f"secure-aggregation job {key}: its phase found no job to answer yet")
    if outcome.status is JobStatus.WAITING:
        assert outcome.job is not None and outcome.header is not None
        deadline = outcome.approval_deadline.isoformat() if outcome.approval_deadline else None
        return Verified(key, job_label(key), "waiting", deadline, describe_job(outcome.job, outcome.header))
    raise _not_accepted(outcome)
