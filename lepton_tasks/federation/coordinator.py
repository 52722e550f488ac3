"""The coordinator's side of a federated run over the exchange: what ``lepton_federated``'s tasks call.

One run, in rounds numbered as the sites see them (a site rejects any round below the last it answered):

    round 0            statistics   every site sends its additive training statistics; the coordinator
                                    merges them, derives the feature names and the round-0 global weights
                                    (the contract's model, built as the trainer builds it, from the seed)
    rounds 1..R        train        the job carries the merged statistics and round k-1's global weights;
                                    accepted updates are aggregated with the run's strategy
    round R+1          evaluate     the job carries round R's global weights; each site scores them on its
                                    held-out split and returns metrics + a score histogram (never rows)

Every round: :func:`send_jobs` → (the DAG's deferrable trigger polls :func:`poll_round` until every site
has a final outcome or the deadline passed) → :func:`decide_round`. A site that does not take part in a
round is an :class:`Exclusion` with its kind — deadline missed, refused (with the site's reasons), reply
failed verification, training failed, answer unusable, reply unreadable — and the reason the report shows.
Fewer accepted sites than ``min_partners`` is a :class:`QuorumError` naming every excluded site and why.

The run's records (its spec, the jobs sent, each round's decision, the global weights, the merged statistics)
and where they live in the coordinator's own object storage: :mod:`lepton_tasks.federation.run_records`.
Sending and deciding are idempotent: a retried or cleared task finds what an earlier try wrote. Under secure
aggregation a statistics or train round is decided on the sum :mod:`lepton_tasks.federation.secagg_driver`
unmasks (:func:`decide_round` ``secure=``); a finished run is published by
:mod:`lepton_tasks.federation.publish`.

No Airflow import here (the DAG and the trigger in ``plugins/lepton_airflow`` wire it); no site address or
credential is ever needed: the coordinator writes into and reads from the exchange buckets of its own storage.

Secure aggregation (``RunSpec.secure_aggregation``): only fedavg and fedprox can run on a sum
(``core.strategies.NEEDS_INDIVIDUAL_UPDATES``): :func:`start_run` refuses any other strategy before the run
starts, and a run with fewer than 3 sites (the protocol's minimum).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from lepton_tasks.core import weights as wio
from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.exchange import JobHeader
from lepton_tasks.core.messages import (
    ExclusionKind,
    GlobalWeightsMeta,
    MergedStatistics,
    RoundAnswer,
    RoundJob,
    TrainerHParams,
    dump,
)
from lepton_tasks.core.strategies import NEEDS_INDIVIDUAL_UPDATES, Strategy
from lepton_tasks.federation.enrollment import EnrollmentError, SiteEntry, SiteRegistry
from lepton_tasks.federation.exchange import (
    ALL_SITES,
    RoundOutcome,
    SiteOutcome,
    SiteStatus,
    collect_answers,
    send_round,
)
from lepton_tasks.federation.run_records import (
    STATISTICS_ROUND,
    Exclusion,
    Mode,
    RoundRecord,
    RunSpec,
    _global_key,
    _global_weights,
    _merged_statistics,
    _record_key,
    _sent_key,
    _spec_key,
    _stats_key,
    exchange_run_id,
    read_record,
    read_sent,
    read_spec,
    round_deadline,
)

if TYPE_CHECKING:
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.signatures import PublicKey, Signer
    from lepton_tasks.federation.secagg_round import SecAggResult

__all__ = [
    "TRAINING_FAILURE_CODES",
    "CoordinatorError",
    "ExclusionKind",
    "QuorumError",
    "RoundNotComplete",
    "RunSetupError",
    "SecureAggregationFailed",
    "aggregate_updates",
    "blocked_by",
    "check_quorum",
    "decide_round",
    "exclusion_of",
    "initial_weights",
    "merge_statistics",
    "poll_round",
    "select_sites",
    "send_jobs",
    "start_run",
    "usable_updates",
]

log = logging.getLogger(__name__)

#: refusal codes a site uses when its trainer failed (the site's job DAG sends them; anything else a site
#: refuses with is its decision)
TRAINING_FAILURE_CODES: Final = frozenset({"training_failed", "trainer_failed"})
#: secure aggregation: the fewest sites the protocol runs with (``federation.secagg.RoundConfig``)
SECAGG_MIN_SITES: Final = 3


class CoordinatorError(RuntimeError):
    """The run cannot go on; retrying does not help (the DAG fails the task at once)."""


class QuorumError(CoordinatorError):
    """Fewer sites than ``min_partners`` are usable: names every excluded site and why."""


class RunSetupError(CoordinatorError):
    """The run's parameters do not fit the registry (a site not enrolled, not pinned, in another
    consortium) or name no contract."""


class SecureAggregationFailed(CoordinatorError):
    """The round's secure aggregation ended without a sum (too few sites at a phase, or a secret that cannot
    be rebuilt); the message names every site lost and why."""


class RoundNotComplete(RuntimeError):
    """Some sites have no final outcome yet and the round's deadline has not passed: wait more."""


# ----------------------------------------------------------------------------------------------------
# start
# ----------------------------------------------------------------------------------------------------


def select_sites(
    entries: Mapping[str, SiteEntry],
    requested: Sequence[str] | None,
    *,
    consortium: str,
    min_partners: int,
) -> list[str]:
    """The sites of a run: ``requested`` (empty or ``None``: every site of ``consortium`` whose key is
    pinned). A requested site that is not enrolled, is in another consortium or has no pinned key is a
    :class:`RunSetupError` (the operator asked for it by name); fewer sites than ``min_partners`` is a
    :class:`QuorumError`."""
    if requested:
        problems = []
        for site in sorted(set(requested)):
            entry = entries.get(site)
            if entry is None:
                problems.append(f"{site}: not enrolled")
            elif entry.consortium != consortium:
                problems.append(f"{site}: enrolled in consortium {entry.consortium!r}, not {consortium!r}")
            elif not entry.pinned:
                problems.append(f"{site}: its key is not pinned yet (pin it after checking its fingerprint)")
        if problems:
            raise RunSetupError(
                "cannot run with the requested sites: "
                + "; ".join(problems)
                + f". Enrolled: {', '.join(sorted(entries)) or '(none)'}"
            )
        chosen = sorted(set(requested))
    else:
        chosen = sorted(s for s, e in entries.items() if e.consortium == consortium and e.pinned)
    if len(chosen) < min_partners:
        unpinned = sorted(s for s, e in entries.items() if e.consortium == consortium and not e.pinned)
        more = f"; enrolled but not pinned: {', '.join(unpinned)}" if unpinned else ""
        raise QuorumError(
            f"only {len(chosen)} site(s) can take part ({', '.join(chosen) or 'none'}), fewer than "
            f"min_partners={min_partners}{more}"
        )
    return chosen


def start_run(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    *,
    airflow_run_id: str,
    consortium: str,
    dataset: str,
    sites: Sequence[str] | None,
    rounds: int,
    strategy: Strategy,
    min_partners: int,
    round_deadline_minutes: float,
    hparams: TrainerHParams,
    trim_beta: float = 0.2,
    krum_f: int = 0,
    secure_aggregation: bool = False,
    now: datetime | None = None,
) -> RunSpec:
    """Write the run's spec (sites, the dataset's contract and its sha256, rounds, strategy, quorum…) and
    return it. Idempotent: a spec already written for this Airflow run is returned unchanged, so a retried
    or cleared ``start`` never changes a run whose jobs went out.

    ``secure_aggregation``: the coordinator learns only sums; checked here, before anything is written: the
    strategy must work on a sum (fedavg, fedprox), at least 3 sites, and every numeric feature of the
    contract needs a public bound for its statistics (:func:`~lepton_tasks.federation.secagg_round.
    statistics_layout`). Each violation is a :class:`RunSetupError` saying what to change."""
    run_id = exchange_run_id(airflow_run_id)
    if storage.exists(bucket, _spec_key(run_id)):
        spec = read_spec(storage, bucket, run_id)
        log.info("run %s already started (spec written before a retry or clear): reusing it", run_id)
        return spec
    if secure_aggregation and strategy in NEEDS_INDIVIDUAL_UPDATES:
        raise RunSetupError(
            f"strategy {strategy!r} needs every site's individual update, but under secure aggregation the "
            "coordinator learns only their sum: choose fedavg or fedprox, or run without secure aggregation"
        )
    try:
        contract = load_contract(dataset)
    except (FileNotFoundError, ValueError) as exc:
        raise RunSetupError(f"no contract for dataset {dataset!r}: {exc}") from None
    try:
        entries = registry.load()
    except EnrollmentError as exc:
        raise RunSetupError(f"the site registry cannot be used: {exc}") from None
    chosen = select_sites(entries, sites, consortium=consortium, min_partners=min_partners)
    if secure_aggregation:
        from lepton_tasks.federation.secagg_round import statistics_layout

        if len(chosen) < SECAGG_MIN_SITES:
            raise RunSetupError(
                f"secure aggregation needs at least {SECAGG_MIN_SITES} sites (the sum of two reveals each "
                f"one's input to the other); this run has {len(chosen)}: {', '.join(chosen)}"
            )
        try:
            statistics_layout(contract)
        except ValueError as exc:
            raise RunSetupError(f"secure aggregation of {contract.version_tag}'s statistics: {exc}") from None
    if hparams.dp is not None:  # the statistics round is one Gaussian release: it needs bounded sums
        from lepton_tasks.federation.private_statistics import UnboundedStatistics, require_bounded

        try:
            require_bounded(contract)
        except UnboundedStatistics as exc:
            raise RunSetupError(str(exc)) from None
    spec = RunSpec(
        run_id=run_id,
        airflow_run_id=airflow_run_id,
        consortium=consortium,
        dataset=dataset,
        contract=contract.version_tag,
        contract_sha256=contract.sha256,
        sites=chosen,
        rounds=rounds,
        strategy=strategy,
        min_partners=min_partners,
        round_deadline_minutes=round_deadline_minutes,
        hparams=hparams,
        trim_beta=trim_beta,
        krum_f=krum_f,
        secure_aggregation=secure_aggregation,
        created_at=(now or datetime.now(UTC)).astimezone(UTC),
    )
    storage.put_json(bucket, _spec_key(run_id), spec.model_dump(mode="json"))
    return spec


# ----------------------------------------------------------------------------------------------------
# send
# ----------------------------------------------------------------------------------------------------


def _contract(spec: RunSpec) -> Contract:
    contract = load_contract(spec.dataset)
    if contract.sha256 != spec.contract_sha256:
        raise CoordinatorError(
            f"run {spec.run_id} was started under {spec.contract} ({spec.contract_sha256[:12]}…) but the "
            f"contract here is now {contract.version_tag} ({contract.sha256[:12]}…): start a new run"
        )
    return contract


def build_job(
    spec: RunSpec,
    contract: Contract,
    mode: Mode,
    *,
    statistics: SufficientStats | None = None,
    feature_names: Sequence[str] = (),
) -> RoundJob:
    """The job every site of the run gets in a ``mode`` round (``send_round`` adds the weights' ref)."""
    return RoundJob(
        mode=mode,
        dataset=spec.dataset,
        contract=contract.document(),
        contract_sha256=spec.contract_sha256,
        strategy=spec.strategy,
        rounds=spec.rounds,
        min_partners=spec.min_partners,
        secure_aggregation=spec.secure_aggregation,
        hparams=spec.hparams,
        feature_names=list(feature_names),
        statistics=statistics,
    )


def send_jobs(
    storage: Storage,
    bucket: str,
    signer: Signer,
    registry: SiteRegistry,
    spec: RunSpec,
    round_: int,
    *,
    now: datetime | None = None,
) -> dict[str, JobHeader]:
    """Send round ``round_``'s signed jobs to every site of the run and record their headers
    (``sent.json``). Train and evaluate jobs carry the merged statistics, the feature names and the
    previous round's global weights. Idempotent: a round already sent is not sent again (its headers are
    returned), so a retried task never gives a site two jobs for one round."""
    if storage.exists(bucket, _sent_key(spec.run_id, round_)):
        log.info("round %d of %s was already sent: not sending it again", round_, spec.run_id)
        return read_sent(storage, bucket, spec.run_id, round_)
    mode = spec.mode_of(round_)
    contract = _contract(spec)
    blobs: dict[str, bytes] = {}
    if mode == "statistics":
        job = build_job(spec, contract, mode)
    else:
        statistics, names = _merged_statistics(storage, bucket, spec.run_id)
        job = build_job(spec, contract, mode, statistics=statistics, feature_names=names)
        previous = round_ - 1  # evaluate: the last train round's model
        blobs[ALL_SITES], _, _ = _global_weights(storage, bucket, spec.run_id, previous)
    sent = send_round(
        storage,
        signer,
        registry,
        consortium=spec.consortium,
        run_id=spec.run_id,
        round=round_,
        jobs=dict.fromkeys(spec.sites, job),
        blobs=blobs,
        ttl=spec.deadline,
        now=now,
    )
    storage.put_json(
        bucket,
        _sent_key(spec.run_id, round_),
        {"round": round_, "mode": mode, "jobs": {s: h.model_dump(mode="json") for s, h in sent.items()}},
    )
    return sent


# ----------------------------------------------------------------------------------------------------
# collect
# ----------------------------------------------------------------------------------------------------


def seen_reply_ids(storage: Storage, bucket: str, spec: RunSpec, before_round: int) -> set[uuid.UUID]:
    """Message ids of the replies accepted in this run's rounds before ``before_round``."""
    seen: set[uuid.UUID] = set()
    for k in range(STATISTICS_ROUND, before_round):
        record = read_record(storage, bucket, spec.run_id, k)
        if record is not None:
            seen |= {uuid.UUID(i) for i in record.reply_ids}
    return seen


def poll_round(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    run_id: str,
    round_: int,
    *,
    now: datetime | None = None,
    coordinator_key: str | PublicKey | None = None,
) -> RoundOutcome:
    """One look at the round's replies (what the trigger calls): :func:`collect_answers` over the jobs
    sent, with the replies accepted in earlier rounds as seen ids. Never raises for one site's fault."""
    spec = read_spec(storage, bucket, run_id)
    sent = read_sent(storage, bucket, run_id, round_)
    return collect_answers(
        storage,
        registry,
        sent,
        seen_ids=seen_reply_ids(storage, bucket, spec, round_),
        now=now,
        coordinator_key=coordinator_key,
        secure_aggregation=spec.secure_aggregation and spec.mode_of(round_) != "evaluate",
    )


# ----------------------------------------------------------------------------------------------------
# decide (pure parts)
# ----------------------------------------------------------------------------------------------------


def exclusion_of(outcome: SiteOutcome, round_: int) -> Exclusion | None:
    """The exclusion a site's round outcome amounts to (``None``: accepted or still pending)."""
    site = outcome.site
    if outcome.status is SiteStatus.MISSING:
        return Exclusion(
            site=site,
            round=round_,
            kind=ExclusionKind.DEADLINE_MISSED,
            reason=outcome.reason or "no answer before the deadline",
        )
    if outcome.status is SiteStatus.REFUSED:
        codes = [str(r.get("code", "?")) for r in outcome.reasons]
        kind = (
            ExclusionKind.TRAINING_FAILED
            if codes and all(c in TRAINING_FAILURE_CODES for c in codes)
            else ExclusionKind.REFUSED
        )
        return Exclusion(
            site=site,
            round=round_,
            kind=kind,
            code=",".join(codes) or None,
            reason=outcome.reason or "refused by the site",
        )
    if outcome.status is SiteStatus.REJECTED:
        code = outcome.rejection.reason_code if outcome.rejection else None
        kind = ExclusionKind.UNREADABLE if code == "unreadable" else ExclusionKind.VERIFICATION_FAILED
        return Exclusion(
            site=site, round=round_, kind=kind, code=code, reason=outcome.reason or "its reply was rejected"
        )
    return None


def _unusable(site: str, round_: int, code: str, reason: str) -> Exclusion:
    return Exclusion(site=site, round=round_, kind=ExclusionKind.UNUSABLE, code=code, reason=reason)


def check_quorum(
    round_: int, mode: str, accepted: Sequence[str], exclusions: Sequence[Exclusion], min_partners: int
) -> None:
    """Raise :class:`QuorumError` when fewer than ``min_partners`` sites are usable in the round; the
    message names every excluded site and why."""
    if len(accepted) >= min_partners:
        return
    why = "; ".join(f"{e.site}: {e.describe()}" for e in sorted(exclusions, key=lambda e: e.site))
    raise QuorumError(
        f"round {round_} ({mode}) is below quorum: {len(accepted)} usable site(s) "
        f"({', '.join(sorted(accepted)) or 'none'}), min_partners={min_partners}. "
        f"Excluded: {why or 'none'}"
    )


def merge_statistics(
    answers: Mapping[str, RoundAnswer], contract: Contract, round_: int = STATISTICS_ROUND
) -> tuple[SufficientStats | None, list[str], list[Exclusion]]:
    """Sum the sites' statistics; a site whose answer carries none, or statistics of another dataset,
    contract version or feature set, is excluded as unusable. Returns ``(merged or None, the sites merged,
    exclusions)``.

    Under DP each site's statistics are a noisy release (``federation.private_statistics``), post-processed
    at the site into valid statistics (integer counts clamped at 0, sums within the declared range times the
    count, a variance >= 0), so the plain sum applies; a merged count of 0 normalizes with mean 0, std 1
    (``GlobalStats.from_stats``)."""
    from lepton_tasks.core.features import SufficientStats, merge

    good: dict[str, SufficientStats] = {}
    out: list[Exclusion] = []
    reference = SufficientStats.empty(contract)
    for site, answer in sorted(answers.items()):
        stats = answer.statistics
        if answer.mode != "statistics" or stats is None:
            out.append(_unusable(site, round_, "no_statistics", f"a {answer.mode} answer without statistics"))
            continue
        if (stats.dataset, stats.contract_version) != (contract.name, contract.version):
            out.append(
                _unusable(
                    site,
                    round_,
                    "wrong_statistics",
                    f"statistics of {stats.dataset}@v{stats.contract_version}, not {contract.version_tag}",
                )
            )
            continue
        if set(stats.numeric) != set(reference.numeric) or set(stats.categorical) != set(
            reference.categorical
        ):
            out.append(_unusable(site, round_, "wrong_statistics", "statistics over another feature set"))
            continue
        good[site] = stats
    merged = merge(good.values()) if good else None
    return merged, sorted(good), out


def usable_updates(
    updates: Sequence[tuple[str, list[np.ndarray], int]],
    reference: Sequence[np.ndarray],
    round_: int,
) -> tuple[list[tuple[str, list[np.ndarray], int]], list[Exclusion]]:
    """The updates that fit the global model (same layers, shapes and finite values); each other one is an
    unusable exclusion naming the layer at fault, so one bad site never fails the aggregation."""
    ok, out = [], []
    for site, arrays, n in updates:
        problem = None
        if len(arrays) != len(reference):
            problem = f"the update has {len(arrays)} layers; the global model has {len(reference)}"
        else:
            for i, (a, ref) in enumerate(zip(arrays, reference, strict=True)):
                if a.shape != ref.shape:
                    problem = f"layer {i} has shape {a.shape}; the global model's is {ref.shape}"
                    break
                if not np.issubdtype(a.dtype, np.floating):
                    problem = f"layer {i} has dtype {a.dtype}, not a float"
                    break
                if not np.all(np.isfinite(a)):
                    problem = f"layer {i} holds NaN or Inf"
                    break
        if problem:
            out.append(_unusable(site, round_, "bad_update", problem))
        else:
            ok.append((site, arrays, n))
    return ok, out


def aggregate_updates(
    strategy: str,
    updates: Sequence[tuple[str, list[np.ndarray], int]],
    *,
    trim_beta: float = 0.2,
    krum_f: int = 0,
) -> list[np.ndarray]:
    """The new global weights from the round's usable updates, with the run's strategy
    (``federation.aggregate``: fedavg, fedprox, median, trimmed_mean, krum).

    Individual updates only: under secure aggregation the coordinator never holds one, and the round's sum
    is unmasked by :func:`~lepton_tasks.federation.secagg_driver.secure_aggregation_step` instead."""
    from lepton_tasks.federation.aggregate import aggregate

    params: dict[str, Any] = {}
    if strategy == "trimmed_mean":
        params["beta"] = trim_beta
    elif strategy == "krum":
        params["f"] = krum_f
    return aggregate(strategy, list(updates), **params)


def initial_weights(contract: Contract, feature_names: Sequence[str], seed: int) -> list[np.ndarray]:
    """Round-0 global weights: the contract's model built exactly as the trainer builds it
    (``trainer.model.build_model(spec, len(feature_names), seed)``), so every site starts from the same
    model. Imports TensorFlow (only when called)."""
    from lepton_tasks.trainer.model import build_model

    model = build_model(contract.model, len(feature_names), seed)
    return [np.asarray(w) for w in model.get_weights()]


# ----------------------------------------------------------------------------------------------------
# decide
# ----------------------------------------------------------------------------------------------------


def _judge(
    outcome: RoundOutcome, round_: int, mode: Mode
) -> tuple[dict[str, RoundAnswer], list[Exclusion], list[str]]:
    """The round's usable answers (accepted, of the round's mode), every exclusion so far, the warnings."""
    exclusions = [e for out in outcome.sites.values() if (e := exclusion_of(out, round_)) is not None]
    warnings = [f"{site}: {w}" for site, out in sorted(outcome.sites.items()) for w in out.warnings]
    answers: dict[str, RoundAnswer] = {}
    for site, out in outcome.accepted.items():
        assert out.answer is not None  # accepted ⇒ a validated answer
        if out.answer.mode != mode:
            why = f"a {out.answer.mode} answer to a {mode} job"
            exclusions.append(_unusable(site, round_, "wrong_mode", why))
        else:
            answers[site] = out.answer
    return answers, exclusions, warnings


def _secure_exclusions(
    answers: Mapping[str, RoundAnswer], secure: SecAggResult, round_: int
) -> tuple[list[str], list[Exclusion]]:
    """The sites whose input is in the secure sum, and an exclusion for every other answering site."""
    out = []
    for site in sorted(set(answers) - set(secure.survivors)):
        if site in secure.recovered:
            why = "dropped out of the secure aggregation after sharing its keys; its masks were removed"
        else:
            why = f"left the secure aggregation: {secure.excluded.get(site, 'no masked input')}"
        out.append(_unusable(site, round_, "secagg_dropout", why))
    return sorted(set(answers) & set(secure.survivors)), out


def _secure_brief(secure: SecAggResult) -> dict[str, Any]:
    return {
        "aggregation_id": str(secure.aggregation_id),
        "purpose": secure.purpose,
        "survivors": list(secure.survivors),
        "recovered": list(secure.recovered),
        "unrevealed": list(secure.unrevealed),
        "error_bound": secure.error_bound,
        "statistics_error": secure.statistics_error,
    }


def _counted(metrics: Mapping[str, Any], answer: RoundAnswer) -> dict[str, Any]:
    """A site's metrics for the record, with ``n`` = the sample count its answer states; an answer under
    secure aggregation states none (it crossed only masked, in the sum), and then no per-site ``n`` is
    made up: the round's total is :func:`_secure_total`'s."""
    out = dict(metrics)
    if answer.n_samples is not None:
        out["n"] = answer.n_samples
    return out


def _secure_total(secure: SecAggResult | None) -> int | None:
    """The round's total sample count from the unmasked sum: the weighted FedAvg's summed ``n`` (an update
    aggregation) or the merged statistics' rows; ``None`` without secure aggregation."""
    if secure is None:
        return None
    if secure.n_samples is not None:
        return int(secure.n_samples)
    return int(secure.statistics.rows) if secure.statistics is not None else None


def decide_round(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    run_id: str,
    round_: int,
    *,
    now: datetime | None = None,
    coordinator_key: str | PublicKey | None = None,
    build_initial: Callable[[Contract, Sequence[str], int], list[np.ndarray]] = initial_weights,
    secure: SecAggResult | None = None,
) -> RoundRecord:
    """Collect round ``round_`` once more, judge every site and act on the accepted ones:

    - statistics: merge them (``stats.json``), derive the feature names, write the round-0 weights;
    - train: aggregate the usable updates with the run's strategy into ``round-<k>/global.npz``;
    - evaluate: per-site held-out metrics and the overall metrics of the merged score histograms.

    Under secure aggregation the statistics and train rounds are decided on ``secure`` (the round's
    unmasked sum, from :func:`secure_aggregation_step`): the sites in it are the accepted ones; a site that
    answered the job but whose input is not in the sum is excluded with the reason.

    Writes ``record.json`` (also when the quorum is missed, for the post-mortem) and returns it; a round
    decided before is returned as recorded. Raises :class:`RoundNotComplete` while some site is pending
    before the deadline, :class:`QuorumError` below ``min_partners``."""
    existing = read_record(storage, bucket, run_id, round_)
    if existing is not None and existing.quorum_met:
        return existing
    spec = read_spec(storage, bucket, run_id)
    mode = spec.mode_of(round_)
    outcome = poll_round(storage, bucket, registry, run_id, round_, now=now, coordinator_key=coordinator_key)
    if not outcome.complete:
        raise RoundNotComplete(
            f"round {round_}: waiting for {', '.join(outcome.pending)} until "
            f"{round_deadline(read_sent(storage, bucket, run_id, round_)).isoformat()}"
        )
    contract = _contract(spec)
    answers, exclusions, warnings = _judge(outcome, round_, mode)
    secured = spec.secure_aggregation and mode != "evaluate"
    if secured and secure is None:
        raise CoordinatorError(
            f"round {round_} ({mode}) of run {run_id} runs under secure aggregation: it is decided on its "
            "unmasked sum (secure_aggregation_step), never on individual answers"
        )
    if not secured and secure is not None:
        raise ValueError(f"round {round_} ({mode}) does not run under secure aggregation")

    metrics: dict[str, dict[str, Any]] = {}
    charges: dict[str, dict[str, Any]] = {}
    overall: dict[str, Any] | None = None
    weights_out: list[np.ndarray] | None = None
    stats_doc: MergedStatistics | None = None
    if mode == "statistics":
        if secure is not None:
            accepted, bad = _secure_exclusions(answers, secure, round_)
            merged = secure.statistics
        else:
            merged, accepted, bad = merge_statistics(answers, contract, round_)
        exclusions += bad
        metrics = {s: _counted({}, answers[s]) for s in accepted}
        charges = {  # under DP each site's statistics are one Gaussian release it charged: it counts in ε
            s: answers[s].model_dump(mode="json", include={"privacy", "budget"})
            for s in accepted
            if answers[s].privacy is not None or answers[s].budget is not None
        }
        check = _record(spec, round_, mode, accepted, exclusions, metrics, None, outcome, warnings)
        _quorum_or_record(storage, bucket, spec, check)
        assert merged is not None  # quorum met ⇒ at least one site merged
        from lepton_tasks.core.features import GlobalStats, feature_names

        names = feature_names(contract, GlobalStats.from_stats(merged, contract))
        weights_out = build_initial(contract, names, spec.hparams.seed)
        stats_doc = MergedStatistics(statistics=merged, feature_names=names, sites=accepted)
    elif mode == "train":
        _, global_prev, _ = _global_weights(storage, bucket, run_id, round_ - 1)
        if secure is not None:
            accepted, bad = _secure_exclusions(answers, secure, round_)
        else:
            raw = [(s, *_arrays(outcome, s)) for s in answers]
            updates, bad = usable_updates(raw, global_prev, round_)
            accepted = sorted(s for s, _, _ in updates)
        exclusions += bad
        metrics = {s: _counted(answers[s].metrics, answers[s]) for s in accepted}
        charges = {
            s: answers[s].model_dump(mode="json", include={"privacy", "budget"})
            for s in accepted
            if answers[s].privacy is not None or answers[s].budget is not None
        }
        check = _record(spec, round_, mode, accepted, exclusions, metrics, None, outcome, warnings)
        _quorum_or_record(storage, bucket, spec, check)
        if secure is not None:
            assert secure.weights is not None  # an update aggregation decodes weights
            weights_out = [
                np.asarray(w).astype(np.asarray(g).dtype)
                for w, g in zip(secure.weights, global_prev, strict=True)
            ]
        else:
            weights_out = aggregate_updates(
                spec.strategy, updates, trim_beta=spec.trim_beta, krum_f=spec.krum_f
            )
    else:
        from lepton_tasks.core.metrics import merge_score_summaries

        summaries: dict[str, dict[str, Any]] = {}
        for site, answer in sorted(answers.items()):
            block = dict(answer.evaluation or {})
            summary = block.pop("score_summary", None)
            if not isinstance(summary, dict):
                why = "no score histogram in the answer"
                exclusions.append(_unusable(site, round_, "no_evaluation", why))
                continue
            try:
                merge_score_summaries([summary])
            except (ValueError, KeyError, TypeError) as exc:
                why = f"unusable score histogram: {exc}"
                exclusions.append(_unusable(site, round_, "bad_evaluation", why))
                continue
            summaries[site] = summary
            metrics[site] = _counted(block, answer)  # hidden count: the histogram's own n stays
        accepted = sorted(summaries)
        charges = {  # under DP each histogram is a Gaussian release the site charged: it counts in epsilon
            s: answers[s].model_dump(mode="json", include={"privacy", "budget"})
            for s in accepted
            if answers[s].privacy is not None or answers[s].budget is not None
        }
        check = _record(spec, round_, mode, accepted, exclusions, metrics, None, outcome, warnings)
        _quorum_or_record(storage, bucket, spec, check)
        overall = merge_score_summaries(summaries.values())

    digest = None
    if weights_out is not None:
        meta = GlobalWeightsMeta(run_id=run_id, round=round_, strategy=spec.strategy, sites=accepted)
        blob = wio.dumps(weights_out, dump(meta))
        digest = wio.sha256(blob)
        storage.put_bytes(bucket, _global_key(run_id, round_), blob)
    if stats_doc is not None:
        storage.put_json(bucket, _stats_key(run_id), dump(stats_doc))
    record = _record(spec, round_, mode, accepted, exclusions, metrics, overall, outcome, warnings, digest)
    record = record.model_copy(
        update={
            "charges": charges,
            "secure_aggregation": _secure_brief(secure) if secure else None,
            "samples_total": _secure_total(secure),
        }
    )
    storage.put_json(bucket, _record_key(run_id, round_), record.model_dump(mode="json"))  # last: the commit
    for e in record.exclusions:
        log.warning("run %s round %d: excluded %s: %s", run_id, round_, e.site, e.describe())
    return record


def _arrays(outcome: RoundOutcome, site: str) -> tuple[list[np.ndarray], int]:
    out = outcome.sites[site]
    assert out.answer is not None
    n = out.answer.n_samples if out.answer.n_samples is not None else 0  # a plain update states it
    if out.update is None:
        return [], n
    arrays, _meta = wio.loads(out.update)
    return arrays, n


def _record(
    spec: RunSpec,
    round_: int,
    mode: Mode,
    accepted: Sequence[str],
    exclusions: Sequence[Exclusion],
    metrics: Mapping[str, dict[str, Any]],
    overall: dict[str, Any] | None,
    outcome: RoundOutcome,
    warnings: Sequence[str],
    digest: str | None = None,
) -> RoundRecord:
    return RoundRecord(
        run_id=spec.run_id,
        round=round_,
        mode=mode,
        quorum_met=len(accepted) >= spec.min_partners,
        accepted=sorted(accepted),
        exclusions=sorted(exclusions, key=lambda e: e.site),
        metrics=dict(metrics),
        overall=overall,
        reply_ids=sorted(str(i) for i in outcome.reply_ids),
        global_weights_sha256=digest,
        warnings=list(warnings),
        decided_at=datetime.now(UTC),
    )


def _quorum_or_record(storage: Storage, bucket: str, spec: RunSpec, record: RoundRecord) -> None:
    """Below quorum: write the record (for the post-mortem) and raise the one clear error."""
    if record.quorum_met:
        return
    storage.put_json(bucket, _record_key(record.run_id, record.round), record.model_dump(mode="json"))
    check_quorum(record.round, record.mode, record.accepted, record.exclusions, spec.min_partners)


def blocked_by(storage: Storage, bucket: str, run_id: str, round_: int) -> str | None:
    """Why round ``round_`` cannot start (the run did not start, or an earlier round was not decided with
    its quorum), or ``None``: the pointer a skipped task gives, naming the task whose log says why."""
    if not storage.exists(bucket, _spec_key(run_id)):
        return "the run did not start: see the `start` task's log"
    for k in range(STATISTICS_ROUND, round_):
        record = read_record(storage, bucket, run_id, k)
        if record is None or not record.quorum_met:
            spec = read_spec(storage, bucket, run_id)
            group = _group_of(spec, k)
            return f"round {k} ({spec.mode_of(k)}) did not complete: see `{group}.collect`'s log"
    return None


def _group_of(spec: RunSpec, round_: int) -> str:
    mode = spec.mode_of(round_)
    return {"statistics": "statistics", "evaluate": "evaluation"}.get(mode, f"round_{round_}")
