"""The site's side of a round: find jobs in its exchange bucket, decide by its own policy, answer or refuse.

A site only ever connects OUT, to its exchange bucket on the coordinator's object storage, with the
bucket-scoped credentials of its enrollment bundle. :func:`poll_jobs` lists the job keys it has not handled;
:func:`handle_job` takes one job through these steps, each of which can end it:

1. **authenticate** — :func:`lepton_tasks.core.exchange.open_message` with the coordinator key pinned in the
   site's policy, the site's own name and bucket, the key the object was read from, the run's current round
   (``min_round``) and the message ids already accepted. A forged, tampered, moved, replayed, expired or
   malformed job raises :class:`~lepton_tasks.core.exchange.MessageRejected`: the site records the reason
   in its state (``handled[key] = "rejected:<reason>"``, so it is not fetched again — except
   ``not_yet_valid``, which a later poll may accept once the clocks agree), logs it, and **sends nothing**.

   Why no signed refusal for a message the site rejects: a refusal names the job it refuses (message id and
   payload hash), and the coordinator binds it to the job it sent. Before the signature verifies, every
   field of the message is attacker-controlled — a site that signed refusals of unauthenticated messages
   would let anyone who can write into its bucket make it sign a refusal of a genuine job (a forged "job"
   copying a real job's id and hash): a denial of service with the site's own key. A moved or replayed
   job is authentic but addressed to another site or to a round already past; a reply to it would be filed
   under that other site's or round's name. So the site stays silent, and the coordinator, when the job it
   sent expires without a reply, reports the site as *missing* and checks whether the job it wrote is still
   in the bucket (``federation.exchange``: "replaced" or "removed after it was sent").
2. **read the job** — the payload must be a :class:`~lepton_tasks.core.messages.RoundJob`; the contract it
   carries must hash to its ``contract_sha256``.
3. **the site's policy** — :func:`~lepton_tasks.core.site_policy.check_job` on a
   :class:`~lepton_tasks.core.site_policy.JobSummary` built from the job; every violation is a reason.
4. **global weights** — the blob the job references must sit in this job's round folder, exist, and match
   the signed size and SHA-256; otherwise ``weights_missing`` / ``weights_tampered``.
5. **privacy budget** — a train job on a dataset the policy gives a budget
   (:meth:`~lepton_tasks.core.site_policy.SitePolicy.budget_for`) must carry DP-SGD settings (else the
   policy refuses it: ``privacy_required``). With ``sample_count`` (the caller's callable: the site's local
   record count for the job, only the site knows it) the site computes the job's planned charge
   (:func:`lepton_tasks.core.privacy.planned_charge`: ``q = batch_size / n``, ``local_epochs x
   ceil(n / batch_size)`` steps) and checks it against its ledger BEFORE asking for approval or training:
   over budget → ``budget_exhausted``, naming ε spent, ε asked and ε limit. A job of a (run, round) this
   site already answered is refused (``round_already_answered``): a second DP-SGD training of the same
   round is a second release, and the ledger holds one charge per (run, round). An **evaluate** job on a
   budgeted dataset must carry DP settings too (else ``privacy_required``: its answer would be an exact
   histogram of the held-out records); its answer is ONE Gaussian release of the score histogram at the
   sigma calibrated from the run's ``dp.evaluation_epsilon`` (``site.training.private_evaluation``,
   :func:`~lepton_tasks.core.privacy.evaluation_sigma`), charged as
   :func:`~lepton_tasks.core.privacy.gaussian_charge` — known before training, checked here, refused with
   ``budget_exhausted`` when it does not fit. A train job RESERVES that release: it is checked with the
   evaluation's entry composed in (:func:`_reserving_budget_reason`; refused ``budget_exhausted`` naming ε
   spent, asked, reserved, limit and remaining when both do not fit), and the entry is recorded with the
   run's first train charge, so the evaluation of a run the site trained in always fits (it is already
   charged: the same key and mechanism cost nothing more).
   A **statistics** job WITH DP settings is released the same way
   (``federation.private_statistics``: the statistics as ONE Gaussian release at the sigma calibrated from
   ``dp.statistics_epsilon``, whatever the trainer computed, with a noisy row count as ``n_samples``),
   charged as ``gaussian_charge(..., release="statistics")`` when its dataset has a budget, checked here first
   (``budget_exhausted``); a contract with a numeric feature whose range ingest does not enforce is refused
   (``statistics_unbounded``). Without DP a statistics job is exact and not charged, and on a budgeted
   dataset refused like an evaluation without DP (``privacy_required``).
6. **approval** — when the policy requires it and no decision was given, the job WAITS (the key stays
   unhandled; the approval deadline counts from the first time the site saw it); a denial, or no decision
   by the deadline, is a refusal.
7. **train and answer** — ``run_trainer(job, global_weights)`` returns a
   :class:`~lepton_tasks.core.messages.RoundAnswer` and the update's bytes. Under a budget the charge to
   record is the trainer's (``answer.privacy``; the planned one when the trainer reports none) and it is
   checked against the ledger again (without ``sample_count`` this is the only check: the update then never
   leaves the site when it would exceed the budget). The site records the charge in the ledger file beside
   its state (same lock, atomic, mode 0600) BEFORE the first byte leaves, so no update ever leaves
   uncharged; a retried task of the same job (same run and round, same mechanism) is not charged again
   (:attr:`~lepton_tasks.core.privacy.Charge.key`). The answer carries the charge and the ledger's totals
   (``answer.budget``) for the coordinator's report. Under DP only DP outputs leave, whatever the trainer
   returned: a train answer loses its training metrics and held-out block, and an evaluation that is not
   the noisy release at the run's evaluation sigma fails the task (nothing is sent). Then the site writes
   the update blob ``answers/<run>/<round>/<answer id>.update`` and the sealed answer (the commit).

**Secure aggregation** (``job.secure_aggregation``, Bonawitz et al. 2017: the coordinator learns only the sum
over the sites). The caller passes the site's :class:`~lepton_tasks.site.secagg.SiteExchange` (``secagg``:
its per-round secrets encrypted under its own Vault key); a site without one refuses a secure statistics or
train job before training (``secure_aggregation_unavailable``). Under secure aggregation the trained update
(or the statistics) does NOT leave with the answer: after the privacy charge the site keeps it
(:func:`~lepton_tasks.site.secagg.hold_input`, encrypted at rest) and answers with its privacy charge and
metrics only — and in a secure run no answer carries the site's sample count (:func:`_without_counts`: the
count crosses only masked, inside the sum). The coordinator's phase jobs (``lepton-secagg-*`` payloads in
the same round folder) are then dispatched by :func:`handle_job` to the site's phases —
:func:`~lepton_tasks.site.secagg.join` (with this site's own check of the setup: bound to the job it
answered, the purpose of what it holds, a layout its input fits), ``share``, ``mask_update`` /
``mask_statistics`` (the held input, masked) and ``reveal``, after which the held input is erased. A phase
job never needs approval: the approval covered the round's job. DP-SGD composes: what is masked is the
DP-trained update, charged before it was held.

Steps 2–6 end in a sealed :class:`~lepton_tasks.core.messages.RoundRefusal` carrying every reason (code,
field, message) — the coordinator reports it as the site's reason for leaving the round. Every object the
site writes is appended to its outbound log BEFORE the put (``core.outbound_log``); answers and their blobs
live under ``answers/``, refusals under ``refusals/``, exactly the prefixes the log reconciles.

A trainer that cannot answer says so by raising :class:`CannotAnswer` (from ``run_trainer`` or
``sample_count``): the site then sends a signed refusal with its code and message, so the coordinator
excludes the site at once, with the reason, instead of waiting for the round's deadline — ``no_usable_data``
(no committed drop of the job's dataset under its contract: retrying cannot add data) or ``trainer_failed``
(the trainer exited non-zero, wrote no or unusable output, or kept failing for a transient reason until its
task's last try). The message is the caller's, written to name what failed without a secret or a data
value. Any other exception from the trainer is NOT turned into a refusal: it propagates (the task fails and
is retried; its text may hold data values, which must not leave the site) and the state is not written.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core import privacy
from lepton_tasks.core.contracts import contract_sha256
from lepton_tasks.core.exchange import (
    AnswerHeader,
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RefusalHeader,
    RejectReason,
    canonical_json,
    job_ref,
    object_key,
    open_message,
    parse_object_key,
    prefix_for,
    reply_header,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import (
    BlobRef,
    DPTraining,
    MessageError,
    PrivacyCharge,
    RoundAnswer,
    RoundJob,
    RoundRefusal,
    dump,
    load,
)
from lepton_tasks.core.outbound_log import OutboundLog, OutboundRecord
from lepton_tasks.core.secagg_messages import SecAggInbox, SecAggRoster, SecAggSetup, SecAggSurvivors
from lepton_tasks.core.signatures import Signer
from lepton_tasks.core.site_policy import (
    SITE_LEDGER,
    BudgetScope,
    JobSummary,
    RefusalCode,
    SitePolicy,
    approval_deadline,
    check_job,
)
from lepton_tasks.federation.exchange import update_key
from lepton_tasks.federation.private_statistics import (
    UnboundedStatistics,
    noisy_statistics,
    require_bounded,
    statistics_charge,
    statistics_sigma,
)
from lepton_tasks.site import secagg as site_secagg
from lepton_tasks.site.secagg import HeldInput, SecAggStateError, SiteExchange, SiteStep, SiteStepStatus
from lepton_tasks.site.state import SiteState, StateDoc

__all__ = [
    "DEFAULT_ANSWER_TTL",
    "SECAGG_JOB_SCHEMAS",
    "CannotAnswer",
    "JobOutcome",
    "JobStatus",
    "SampleCount",
    "SiteRefusalCode",
    "Trainer",
    "handle_job",
    "poll_jobs",
    "run_pending",
]

log = logging.getLogger(__name__)

#: how long an answer stays valid: long enough for a coordinator that collects after the job's deadline
DEFAULT_ANSWER_TTL: Final = timedelta(days=7)

#: payload schemas of the coordinator's secure-aggregation phase jobs (dispatched to ``site.secagg``)
SECAGG_JOB_SCHEMAS: Final = frozenset(
    m.payload_schema for m in (SecAggSetup, SecAggRoster, SecAggInbox, SecAggSurvivors)
)

#: ``run_trainer(job, global_weights_or_None) -> (answer, update_bytes_or_None)``; the site fills
#: ``answer.update`` with the blob it writes
Trainer = Callable[[RoundJob, bytes | None], tuple[RoundAnswer, bytes | None]]

#: ``sample_count(job) -> n``: how many training records the site's trainer will use for ``job`` (its
#: staged training split of the job's dataset); lets the site check its privacy budget before it trains
SampleCount = Callable[[RoundJob], int]


class JobStatus(StrEnum):
    ANSWERED = "answered"  # update blob + sealed answer written
    REFUSED = "refused"  # sealed refusal written, with every reason
    WAITING = "waiting"  # authentic and allowed, waiting for a human's approval
    REJECTED = "rejected"  # not authentic / not for here / not now: nothing written, reason logged


class SiteRefusalCode(StrEnum):
    """Refusal reasons of the site's own checks (the policy's are ``core.site_policy.RefusalCode``)."""

    INVALID_JOB = "invalid_job"  # the signed payload is not a RoundJob this site understands
    CONTRACT_INCONSISTENT = "contract_inconsistent"  # the carried contract does not hash to contract_sha256
    WEIGHTS_MISSING = "weights_missing"  # the global-weights blob is not in the bucket
    WEIGHTS_TAMPERED = "weights_tampered"  # its size/hash differ from the signed job, or it is misplaced
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_TIMEOUT = "approval_timeout"
    #: a DP-SGD charge under the same (run, round) with other parameters is already in the ledger
    PRIVACY_LEDGER_CONFLICT = "privacy_ledger_conflict"
    #: the site already answered this (run, round) under its privacy budget (a re-sent job)
    ROUND_ALREADY_ANSWERED = "round_already_answered"
    #: no verified, committed drop of the job's dataset under its contract (nothing to train on)
    NO_USABLE_DATA = "no_usable_data"
    #: the trainer failed (exit code, no or unusable output, or a transient failure on the last try); the
    #: coordinator counts it as a training failure (``federation.coordinator.TRAINING_FAILURE_CODES``)
    TRAINER_FAILED = "trainer_failed"
    #: a secure-aggregation job, but this site has no key to keep its round secrets (not set up for it)
    SECURE_AGGREGATION_UNAVAILABLE = "secure_aggregation_unavailable"
    #: a secure-aggregation round whose input this site already masked (a re-sent job): it holds no other
    SECAGG_INPUT_ALREADY_MASKED = "secagg_input_already_masked"
    #: a DP statistics job on a contract with a numeric feature whose range ingest does not enforce (its
    #: sums have no finite sensitivity: ``federation.private_statistics``)
    STATISTICS_UNBOUNDED = "statistics_unbounded"


class CannotAnswer(RuntimeError):
    """Raised by a :data:`Trainer` (or a :data:`SampleCount`) when the site cannot answer the job: instead of
    failing silently (the coordinator would wait for the round's deadline), :func:`handle_job` sends a signed
    refusal with ``code``, ``field`` and the message. The message crosses to the coordinator: it must name
    what failed without a secret or a data value (build it from codes and counts, not from exception text)."""

    def __init__(self, code: str, message: str, *, field: str = "training") -> None:
        super().__init__(message)
        self.code, self.field, self.message = str(code), field, message

    def reason(self) -> dict[str, str]:
        """The refusal reason (code, field, message) it becomes."""
        return _reason(self.code, self.field, self.message)


@dataclass(frozen=True)
class JobOutcome:
    """What :func:`handle_job` did with the job at ``key``."""

    key: str
    status: JobStatus
    #: the job's header and payload, once authenticated (``None`` when rejected)
    header: JobHeader | None = None
    job: RoundJob | None = None
    #: the site's sealed reply (answered / refused)
    reply: AnswerHeader | RefusalHeader | None = None
    #: refusal reasons sent (code, field, message)
    reasons: tuple[dict[str, str], ...] = ()
    #: why the job was rejected (``reason_code``, ``field``, ``message``)
    rejection: dict[str, str | None] | None = None
    #: keys the site wrote into its exchange bucket for this job
    written: tuple[str, ...] = ()
    #: when a waiting job will be refused
    approval_deadline: datetime | None = None
    #: a secure-aggregation phase job: what the site's phase did (``site.secagg.SiteStep``)
    secagg: SiteStep | None = None


def poll_jobs(storage: Storage, bucket: str, *, last_seen: Container[str] = ()) -> list[str]:
    """Job keys in ``bucket`` that are not in ``last_seen`` (the keys already handled).

    Only canonical message keys (``jobs/<run>/<round>/<uuid>.json``) are returned; blobs beside them are
    skipped. Order: by run, the NEWEST round first — a site that finds several rounds of a run waiting works
    on the current one, and the older ones are then stale (rejected as replays by :func:`handle_job`).
    """
    found = []
    for obj in storage.list(bucket, prefix_for(MessageKind.JOB)):
        if obj.key in last_seen:
            continue
        try:
            parts = parse_object_key(obj.key)
        except ValueError:
            continue  # a blob, or something that is no message: never opened
        found.append((parts.run_id, -parts.round, obj.key))
    return [key for _, _, key in sorted(found)]


def _reason(code: str, field: str, message: str) -> dict[str, str]:
    return {"code": code, "field": field, "message": message}


def _summary(header: JobHeader, job: RoundJob) -> tuple[JobSummary, list[dict[str, str]]]:
    reasons = []
    actual = contract_sha256(job.contract)
    if actual != job.contract_sha256:
        reasons.append(
            _reason(
                SiteRefusalCode.CONTRACT_INCONSISTENT,
                "contract_sha256",
                f"the contract the job carries hashes to {actual[:12]}…, "
                f"not to the job's contract_sha256 {job.contract_sha256[:12]}…",
            )
        )
    summary = JobSummary(
        consortium=header.consortium,
        dataset=job.dataset,
        contract_hash=actual,
        rounds=job.rounds,
        strategy=job.strategy,
        min_partners=job.min_partners,
        secure_aggregation=job.secure_aggregation,
        mode=job.mode,
        differential_privacy=job.hparams.dp is not None,
    )
    return summary, reasons


def _budget_reason(
    ledger: privacy.PrivacyLedger, scope: BudgetScope, entry: privacy.Charge
) -> dict[str, str] | None:
    """Why ``entry`` cannot be charged to ``ledger`` (``None``: it can; already charged costs nothing)."""
    what = (
        "this site's privacy budget"
        if scope.ledger == SITE_LEDGER
        else f"the privacy budget of dataset {scope.ledger!r}"
    )
    try:
        privacy.check_job(ledger, entry)
    except privacy.BudgetExceeded as exc:
        limit = ledger.budget.epsilon
        return {
            **_reason(
                RefusalCode.BUDGET_EXHAUSTED,
                "hparams.dp",
                f"{what} is exhausted: ε spent {exc.spent:.4g}, this job asks ε {exc.job:.4g} "
                f"(ε {exc.total:.4g} composed with what is spent), ε limit {limit:g} at δ = {exc.delta:g}; "
                f"ε remaining {exc.remaining:.4g} (σ = {entry.noise_multiplier:g}, "
                f"q = {entry.sampling_rate:.4g}, {entry.steps} steps)",
            ),
            "epsilon_spent": f"{exc.spent:.6g}",
            "epsilon_asked": f"{exc.job:.6g}",
            "epsilon_limit": f"{limit:g}",
            "epsilon_remaining": f"{exc.remaining:.6g}",
            "delta": f"{exc.delta:g}",
        }
    except ValueError as exc:  # a different charge under the same (run, round), or shuffled batches
        return _reason(SiteRefusalCode.PRIVACY_LEDGER_CONFLICT, "hparams.dp", f"{what}: {exc}")
    return None


def _answered_before(doc: StateDoc, key: str, run_id: str, round_: int) -> bool:
    """Whether the site answered another job of ``run_id`` round ``round_`` (a re-sent round)."""
    for other, outcome in doc.handled.items():
        if other == key or outcome != JobStatus.ANSWERED.value:
            continue
        try:
            parts = parse_object_key(other)
        except ValueError:
            continue
        if parts.run_id == run_id and parts.round == round_:
            return True
    return False


def _global_weights(
    storage: Storage, bucket: str, header: JobHeader, ref: BlobRef
) -> tuple[bytes | None, dict[str, str] | None]:
    """The job's global weights, or the refusal reason why they cannot be used."""
    folder = prefix_for(MessageKind.JOB, header.run_id, header.round)
    if not ref.key.startswith(folder) or "/" in ref.key[len(folder) :]:
        return None, _reason(
            SiteRefusalCode.WEIGHTS_TAMPERED,
            "global_weights.key",
            f"the global weights {ref.key!r} are not in this job's folder {folder!r}",
        )
    if not storage.exists(bucket, ref.key):
        return None, _reason(
            SiteRefusalCode.WEIGHTS_MISSING,
            "global_weights.key",
            f"the global weights {ref.key!r} are not in the exchange bucket",
        )
    data = storage.get_bytes(bucket, ref.key)
    if len(data) != ref.size or sha256_hex(data) != ref.sha256:
        return None, _reason(
            SiteRefusalCode.WEIGHTS_TAMPERED,
            "global_weights.sha256",
            f"the global weights {ref.key!r} ({len(data)} bytes, sha256 {sha256_hex(data)[:12]}…) are not "
            f"the ones the signed job names ({ref.size} bytes, sha256 {ref.sha256[:12]}…)",
        )
    return data, None


class _Writer:
    """Puts objects into the site's exchange bucket, each logged in the outbound log first."""

    def __init__(self, storage: Storage, bucket: str, outbound_log: OutboundLog, now: datetime) -> None:
        self.storage, self.bucket, self.outbound_log, self.now = storage, bucket, outbound_log, now
        self.written: list[str] = []

    def put(
        self, kind: MessageKind, key: str, data: bytes, *, run_id: str, round_: int, message_id: uuid.UUID
    ) -> None:
        self.outbound_log.append(
            OutboundRecord.for_object(
                kind=kind,
                bucket=self.bucket,
                object_key=key,
                data=data,
                run_id=run_id,
                round=round_,
                message_id=message_id,
                now=self.now,
            )
        )
        content_type = "application/json" if key.endswith(".json") else "application/octet-stream"
        self.storage.put_bytes(self.bucket, key, data, content_type=content_type)
        self.written.append(key)


def handle_job(
    raw: bytes,
    *,
    key: str,
    policy: SitePolicy,
    state: SiteState,
    run_trainer: Trainer,
    signer: Signer,
    storage: Storage,
    bucket: str,
    outbound_log: OutboundLog,
    approved: bool | None = None,
    now: datetime | None = None,
    answer_ttl: timedelta = DEFAULT_ANSWER_TTL,
    sample_count: SampleCount | None = None,
    secagg: SiteExchange | None = None,
) -> JobOutcome:
    """Authenticate the job read from ``bucket``/``key``, decide by ``policy``, and answer, refuse, wait or
    reject it (see the module docstring). The coordinator's key is the one pinned in ``policy``; ``state``
    is the site's local state (seen ids, rounds, handled keys, privacy ledgers), locked for the whole call.

    ``approved``: the human decision when the policy requires approval (``None``: none yet).
    ``sample_count``: the site's training record count for a job, so a train job under a privacy budget is
    checked against it before approval and training (``None``: checked after training, before anything is
    sent, on the charge the trainer reports).
    ``secagg``: the site's secure-aggregation context; with it, the coordinator's phase jobs are accepted
    and dispatched to the site's phases (module docstring), without it they are rejected
    (``wrong_payload_schema``) and a secure job is refused.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    with state.transaction() as doc:
        try:
            run_id: str | None = parse_object_key(key).run_id
        except ValueError:
            run_id = None  # open_message rejects it as moved: it is not where any message belongs
        expected = Expectation.for_job(
            consortium=policy.consortium,
            site=policy.site,
            bucket=bucket,
            object_key=key,
            min_round=doc.min_round(run_id) if run_id is not None else 0,
            payload_schemas=frozenset({RoundJob.payload_schema})
            | (SECAGG_JOB_SCHEMAS if secagg is not None else frozenset()),
        )
        try:
            opened, payload = open_message(
                raw,
                expected=expected,
                public_key=policy.coordinator.pinned_key(),
                seen_ids=doc.seen_ids,
                now=now,
            )
        except MessageRejected as exc:
            log.warning("site %s rejected s3://%s/%s: %s", policy.site, bucket, key, exc)
            if exc.reason_code is not RejectReason.NOT_YET_VALID:  # the only one that time can cure
                doc.finish(key, f"rejected:{exc.reason_code.value}")
            return JobOutcome(key, JobStatus.REJECTED, rejection=exc.to_dict())
        assert isinstance(opened, JobHeader)  # expected.kinds is {job}
        header = opened
        doc.accept_round(header.run_id, header.round)
        if header.payload_schema in SECAGG_JOB_SCHEMAS:
            assert secagg is not None  # only then are they expected
            return _secagg_phase(doc, header, payload, key=key, ctx=secagg, now=now)
        return _decide(
            doc,
            header,
            payload,
            state=state,
            sample_count=sample_count,
            key=key,
            policy=policy,
            run_trainer=run_trainer,
            signer=signer,
            storage=storage,
            writer=_Writer(storage, bucket, outbound_log, now),
            approved=approved,
            now=now,
            answer_ttl=answer_ttl,
            secagg=secagg,
        )


def _decide(
    doc: StateDoc,
    header: JobHeader,
    payload: bytes,
    *,
    state: SiteState,
    sample_count: SampleCount | None,
    key: str,
    policy: SitePolicy,
    run_trainer: Trainer,
    signer: Signer,
    storage: Storage,
    writer: _Writer,
    approved: bool | None,
    now: datetime,
    answer_ttl: timedelta,
    secagg: SiteExchange | None = None,
) -> JobOutcome:
    def refuse(reasons: list[dict[str, str]], job: RoundJob | None = None) -> JobOutcome:
        body = canonical_json(dump(RoundRefusal(reasons=reasons)))
        reply = reply_header(
            header,
            MessageKind.REFUSAL,
            payload=body,
            payload_schema=RoundRefusal.payload_schema,
            ttl=answer_ttl,
            now=now,
        )
        writer.put(
            MessageKind.REFUSAL,
            object_key(reply),
            seal(reply, body, signer),
            run_id=header.run_id,
            round_=header.round,
            message_id=reply.message_id,
        )
        doc.finish(key, JobStatus.REFUSED.value, header.message_id)
        log.info("site %s refused %s: %s", policy.site, key, ", ".join(r["code"] for r in reasons))
        return JobOutcome(
            key,
            JobStatus.REFUSED,
            header=header,
            job=job,
            reply=reply,
            reasons=tuple(reasons),
            written=tuple(writer.written),
        )

    try:
        job = load(RoundJob, payload, where=f"s3://{header.bucket}/{key}")
    except MessageError as exc:
        return refuse([_reason(SiteRefusalCode.INVALID_JOB, "payload", str(exc))])

    summary, reasons = _summary(header, job)
    reasons += [r.model_dump(mode="json") for r in check_job(policy, summary)]
    secure = job.secure_aggregation and job.mode != "evaluate"
    if secure and secagg is None:
        reasons.append(
            _reason(
                SiteRefusalCode.SECURE_AGGREGATION_UNAVAILABLE,
                "secure_aggregation",
                "this site is not set up for secure aggregation (no key of its own to keep a round's "
                "secrets): it cannot take part in a secure run",
            )
        )
    if (problem := _release_needs_dp(policy, job)) is not None:
        reasons.append(problem)
    if (problem := _statistics_need_bounds(job)) is not None:
        reasons.append(problem)
    if reasons:
        return refuse(reasons, job)

    global_weights: bytes | None = None
    if job.global_weights is not None:
        global_weights, problem = _global_weights(storage, header.bucket, header, job.global_weights)
        if problem is not None:
            return refuse([problem], job)

    # the privacy budget (train and evaluate jobs on a budgeted dataset; those without DP were refused above)
    # statistics: charged only with DP (without it they are exact, protected by secure aggregation alone,
    # and refused above on a budgeted dataset)
    charged = job.mode in ("train", "evaluate") or (job.mode == "statistics" and job.hparams.dp is not None)
    scope = policy.budget_for(job.dataset) if charged else None
    ledger: privacy.PrivacyLedger | None = None
    planned: PrivacyCharge | None = None
    if scope is not None:
        dp = job.hparams.dp
        assert dp is not None  # check_job refused a train job without DP-SGD under a budget
        if _answered_before(doc, key, header.run_id, header.round):
            return refuse(
                [
                    _reason(
                        SiteRefusalCode.ROUND_ALREADY_ANSWERED,
                        "round",
                        f"this site already answered run {header.run_id!r} round {header.round} with an "
                        "answer charged to its privacy budget; it does not release the same round twice",
                    )
                ],
                job,
            )
        ledger = state.read_ledger(scope)
        if job.mode == "statistics":  # one Gaussian release (federation.private_statistics)
            entry = statistics_charge(dp, run_id=header.run_id, round=header.round, dataset=job.dataset)
            if (problem := _budget_reason(ledger, scope, entry)) is not None:
                return refuse([problem], job)
        elif job.mode == "evaluate":  # one Gaussian release: its cost does not depend on the data
            entry = _evaluation_entry(header, job, dp)  # reserved when this run trained: it fits then
            if (problem := _budget_reason(ledger, scope, entry)) is not None:
                return refuse([problem], job)
        elif sample_count is not None:
            try:
                n = sample_count(job)
            except CannotAnswer as exc:  # e.g. no usable data: known before approval and training
                return refuse([exc.reason()], job)
            planned = privacy.planned_charge(dp, n, job.hparams.batch_size, job.hparams.local_epochs)
            entry = privacy.ledger_charge(
                planned, run_id=header.run_id, round=header.round, dataset=job.dataset
            )
            reserve = _evaluation_reserve(header, job, dp)
            if (problem := _reserving_budget_reason(ledger, scope, entry, reserve)) is not None:
                return refuse([problem], job)

    if approved is False:
        return refuse(
            [_reason(SiteRefusalCode.APPROVAL_DENIED, "approval", "the site's approver declined this job")],
            job,
        )
    if policy.approval.required and approved is not True:
        deadline = approval_deadline(policy, doc.received_at(key, now))
        assert deadline is not None  # approval is required
        if now >= deadline:
            return refuse(
                [
                    _reason(
                        SiteRefusalCode.APPROVAL_TIMEOUT,
                        "approval",
                        f"no approval by the site's deadline {deadline.isoformat()}",
                    )
                ],
                job,
            )
        return JobOutcome(key, JobStatus.WAITING, header=header, job=job, approval_deadline=deadline)

    try:
        answer, update = run_trainer(job, global_weights)
    except CannotAnswer as exc:
        log.warning("site %s cannot answer %s: %s", policy.site, key, exc)
        return refuse([exc.reason()], job)
    if answer.mode != job.mode:
        raise ValueError(f"the trainer answered a {answer.mode!r} job; the job is {job.mode!r}")
    if job.hparams.dp is not None:
        answer = _only_private(header, job, answer, job.hparams.dp)
        if job.mode == "statistics":
            answer = _private_statistics(header, job, answer, job.hparams.dp)
    if scope is not None and ledger is not None:
        answer, problem = _charge(state, scope, ledger, header, job, answer, planned)
        if problem is not None:
            return refuse([problem], job)  # trained, but nothing leaves the site
    if secure:
        assert secagg is not None  # refused above otherwise
        try:
            answer, update = _hold(secagg, header, job, answer, update)
        except SecAggStateError as exc:
            return refuse([_reason(SiteRefusalCode.SECAGG_INPUT_ALREADY_MASKED, "round", str(exc))], job)
    if job.secure_aggregation:  # the site's sample count crosses only masked, inside the sum
        answer = _without_counts(job, answer)
    answer_id = uuid.uuid4()
    if update is not None:
        blob_key = update_key(header.run_id, header.round, answer_id)
        answer = answer.model_copy(
            update={"update": BlobRef(key=blob_key, sha256=sha256_hex(update), size=len(update))}
        )
        writer.put(
            MessageKind.ANSWER,
            blob_key,
            update,
            run_id=header.run_id,
            round_=header.round,
            message_id=answer_id,
        )
    body = canonical_json(dump(answer))
    reply = reply_header(
        header,
        MessageKind.ANSWER,
        payload=body,
        payload_schema=RoundAnswer.payload_schema,
        ttl=answer_ttl,
        now=now,
        message_id=answer_id,
    )
    assert isinstance(reply, AnswerHeader)
    writer.put(
        MessageKind.ANSWER,
        object_key(reply),
        seal(reply, body, signer),
        run_id=header.run_id,
        round_=header.round,
        message_id=answer_id,
    )
    doc.finish(key, JobStatus.ANSWERED.value, header.message_id)
    return JobOutcome(
        key, JobStatus.ANSWERED, header=header, job=job, reply=reply, written=tuple(writer.written)
    )


def _hold(
    ctx: SiteExchange, header: JobHeader, job: RoundJob, answer: RoundAnswer, update: bytes | None
) -> tuple[RoundAnswer, None]:
    """Keep the round's update (train) or statistics at the site, encrypted, for the secure aggregation; the
    answer that leaves carries neither."""
    if job.mode == "train":
        if update is None:
            raise RuntimeError(
                f"the trainer returned no update for run {header.run_id!r} round {header.round}: nothing sent"
            )
        data, purpose = update, "update"
    else:
        if answer.statistics is None:
            raise RuntimeError(
                f"the trainer returned no statistics for run {header.run_id!r} round {header.round}: "
                "nothing sent"
            )
        data, purpose = answer.statistics.model_dump_json().encode(), "statistics"
    ref = job_ref(header)
    site_secagg.hold_input(
        ctx,
        HeldInput(
            site=ctx.site,
            run_id=header.run_id,
            round=header.round,
            purpose=purpose,
            job_message_id=ref.message_id,
            job_payload_sha256=ref.payload_sha256,
            n_samples=answer.n_samples,
            dataset=job.dataset,
            contract_sha256=job.contract_sha256,
            data=data,
        ),
    )
    log.info(
        "site %s holds its %s of run %s round %d for secure aggregation",
        ctx.site,
        purpose,
        header.run_id,
        header.round,
    )
    return answer.model_copy(update={"update": None, "statistics": None}), None


def _accept_setup(held: HeldInput | None, setup: SecAggSetup) -> list[dict[str, str]]:
    """The site's own checks of an aggregation's setup against what it holds: the reasons to refuse."""
    code = site_secagg.SecAggRefusalCode.INVALID_SETUP.value
    where = f"run {setup.run_id!r} round {setup.round}"
    if held is None:
        return [
            _reason(code, "for_job", f"this site holds no input of {where}: it answered no secure job there")
        ]
    reasons = []
    if setup.purpose != held.purpose:
        reasons.append(
            _reason(code, "purpose", f"a {setup.purpose} aggregation; this site holds a {held.purpose}")
        )
    bound = setup.for_job
    if bound is None or (bound.message_id, bound.payload_sha256) != (
        held.job_message_id,
        held.job_payload_sha256,
    ):
        reasons.append(
            _reason(
                code,
                "for_job",
                f"the aggregation is bound to job {bound.message_id if bound else None}, not to the job "
                f"{held.job_message_id} this site answered in {where}",
            )
        )
    if setup.update is not None:
        from lepton_tasks.core import weights as wio

        arrays, _ = wio.loads(held.data)
        shapes = [list(a.shape) for a in arrays]
        if shapes != setup.update.shapes:
            reasons.append(
                _reason(
                    code,
                    "update.shapes",
                    f"the layout's shapes {setup.update.shapes} are not the update's {shapes}",
                )
            )
        if held.n_samples > setup.update.max_samples:
            reasons.append(
                _reason(
                    code,
                    "update.max_samples",
                    f"the layout weights at most {setup.update.max_samples} "
                    "samples; this site's update has more",
                )
            )
    if setup.statistics is not None:
        if setup.statistics.contract_sha256 != held.contract_sha256:
            reasons.append(_reason(code, "statistics.contract_sha256", "statistics of another contract"))
        if held.n_samples > setup.statistics.max_rows:
            reasons.append(
                _reason(
                    code,
                    "statistics.max_rows",
                    f"the layout counts at most {setup.statistics.max_rows} rows; this site has more",
                )
            )
    return reasons


_PHASE_STATUS: Final = {
    SiteStepStatus.ANSWERED: JobStatus.ANSWERED,
    SiteStepStatus.DONE: JobStatus.ANSWERED,
    SiteStepStatus.REFUSED: JobStatus.REFUSED,
    SiteStepStatus.REJECTED: JobStatus.REJECTED,
    SiteStepStatus.WAITING: JobStatus.WAITING,
}


def _secagg_phase(
    doc: StateDoc, header: JobHeader, payload: bytes, *, key: str, ctx: SiteExchange, now: datetime
) -> JobOutcome:
    """Dispatch an authentic secure-aggregation phase job to the site's phase (``site.secagg``), which
    finds it in the round's folder, opens it again under the aggregation it joined, and answers."""
    run_id, round_ = header.run_id, header.round
    held = site_secagg.held_input(ctx, run_id=run_id, round=round_)
    schema = header.payload_schema
    step: SiteStep | None = None
    if schema == SecAggSetup.payload_schema:
        try:
            purpose = SecAggSetup.model_validate_json(payload).purpose
        except ValueError:  # join rejects it with the reason when it opens it
            purpose = held.purpose if held is not None else "update"
        step = site_secagg.join(
            ctx,
            run_id=run_id,
            round=round_,
            purpose=purpose,
            accept=lambda s: _accept_setup(held, s),
            now=now,
        )
    elif held is None:
        log.warning(
            "site %s: %s job %s of run %s round %d, but the site holds no input of that round (it never "
            "joined, or it revealed already): nothing to do",
            ctx.site,
            schema,
            key,
            run_id,
            round_,
        )
        doc.finish(key, "secagg:no_input", header.message_id)
        return JobOutcome(
            key,
            JobStatus.REJECTED,
            header=header,
            rejection={"reason_code": "no_input", "field": None, "message": "no input held for this round"},
        )
    elif schema == SecAggRoster.payload_schema:
        step = site_secagg.share(ctx, run_id=run_id, round=round_, purpose=held.purpose, now=now)
    elif schema == SecAggInbox.payload_schema:
        if held.purpose == "update":
            from lepton_tasks.core import weights as wio

            arrays, _ = wio.loads(held.data)
            step = site_secagg.mask_update(
                ctx, run_id=run_id, round=round_, arrays=arrays, n_samples=held.n_samples, now=now
            )
        else:
            from lepton_tasks.core.contracts import load_contract
            from lepton_tasks.core.features import SufficientStats

            contract = load_contract(held.dataset)
            if contract.sha256 != held.contract_sha256:
                raise SecAggStateError(
                    f"the site's contract {contract.version_tag} is not the one of run {run_id}'s statistics"
                )
            step = site_secagg.mask_statistics(
                ctx,
                run_id=run_id,
                round=round_,
                statistics=SufficientStats.model_validate_json(held.data),
                contract=contract,
                now=now,
            )
    else:
        assert schema == SecAggSurvivors.payload_schema
        step = site_secagg.reveal(ctx, run_id=run_id, round=round_, purpose=held.purpose, now=now)
        if step.status in (SiteStepStatus.ANSWERED, SiteStepStatus.DONE):
            site_secagg.release_input(ctx, run_id=run_id, round=round_)
    status = _PHASE_STATUS[step.status]
    if status is not JobStatus.WAITING:
        doc.finish(key, f"secagg:{step.phase.value}:{step.status.value}", header.message_id)
    log.info(
        "site %s: secure aggregation %s of run %s round %d: %s",
        ctx.site,
        step.phase.value,
        run_id,
        round_,
        step.status.value,
    )
    return JobOutcome(key, status, header=header, reasons=step.reasons, written=step.written, secagg=step)


def _release_needs_dp(policy: SitePolicy, job: RoundJob) -> dict[str, str] | None:
    """The refusal of an evaluation or statistics job WITHOUT DP on a dataset under a privacy budget
    (``None``: no objection): its answer would be an exact histogram of the site's held-out records, or its
    exact counts, sums and sums of squares. (A train job without DP is refused by the policy itself.)"""
    if job.mode not in ("evaluate", "statistics") or job.hparams.dp is not None:
        return None
    if policy.dataset(job.dataset) is None:
        return None
    scope = policy.budget_for(job.dataset)
    if scope is None:
        return None
    what = "evaluations" if job.mode == "evaluate" else "statistics"
    return _reason(
        RefusalCode.PRIVACY_REQUIRED,
        "hparams.dp",
        f"this site releases {what} of {job.dataset!r} only with differential privacy (budget "
        f"ε ≤ {scope.budget.epsilon:g}, δ = {scope.budget.delta:g}); the job declares no DP settings",
    )


def _statistics_need_bounds(job: RoundJob) -> dict[str, str] | None:
    """The refusal of a DP statistics job whose contract has a numeric feature without an enforced range
    (``None``: no objection, or not a DP statistics job): its sums could not be released with DP."""
    if job.mode != "statistics" or job.hparams.dp is None:
        return None
    from lepton_tasks.core.contracts import Contract

    try:
        require_bounded(Contract.model_validate(job.contract))
    except UnboundedStatistics as exc:
        return _reason(SiteRefusalCode.STATISTICS_UNBOUNDED, "contract", str(exc))
    except ValueError as exc:  # pydantic's ValidationError: the carried contract is not one
        return _reason(SiteRefusalCode.INVALID_JOB, "contract", f"the job's contract is not valid: {exc}")
    return None


def _private_statistics(header: JobHeader, job: RoundJob, answer: RoundAnswer, dp: DPTraining) -> RoundAnswer:
    """The statistics answer of a DP job: the trainer's exact statistics replaced by ONE Gaussian release
    (:func:`lepton_tasks.federation.private_statistics.noisy_statistics` at the sigma calibrated from
    ``dp.statistics_epsilon``), ``n_samples`` by its noisy row count, and the release's cost in ``privacy``
    (charged to a budget by :func:`_charge`). Whatever the trainer returned, the exact statistics never leave;
    no statistics → ``RuntimeError``, nothing sent."""
    from lepton_tasks.core.contracts import Contract

    if answer.statistics is None:
        raise RuntimeError(
            f"the trainer returned no statistics for run {header.run_id!r} round {header.round}: nothing sent"
        )
    sigma = statistics_sigma(dp)
    noisy = noisy_statistics(answer.statistics, Contract.model_validate(job.contract), sigma)
    log.info(
        "site: statistics of run %s round %d released with Gaussian noise (σ = %.4g, ε ≤ %g)",
        header.run_id,
        header.round,
        sigma,
        dp.statistics_epsilon,
    )
    return answer.model_copy(
        update={
            "statistics": noisy,
            "n_samples": noisy.rows,
            "privacy": privacy.gaussian_privacy_charge(sigma, dp.delta),
            "metrics": {},
        }
    )


def _only_private(header: JobHeader, job: RoundJob, answer: RoundAnswer, dp: DPTraining) -> RoundAnswer:
    """What of a DP job's answer may leave: a train answer loses its training metrics and held-out block
    (``site.training``: dropped under DP), and an evaluation must be the noisy one
    (:func:`lepton_tasks.site.training.private_evaluation`, at the sigma calibrated from the run's evaluation
    epsilon or more); otherwise ``RuntimeError`` (the task fails, nothing is sent)."""
    if job.mode == "train":
        return answer.model_copy(update={"metrics": {}, "evaluation": None})
    if job.mode != "evaluate":
        return answer
    needed = privacy.evaluation_sigma(dp)  # calibrated from the run's evaluation epsilon
    mech = (answer.evaluation or {}).get("dp")
    summary = (answer.evaluation or {}).get("score_summary")
    if (
        not isinstance(mech, dict)
        or mech.get("mechanism") != "gaussian"
        or not isinstance(sigma := mech.get("noise_multiplier"), (int, float))
        or sigma < needed
        or not isinstance(summary, dict)
        or not isinstance(total := summary.get("n"), int)
        or answer.n_samples != max(total, 0)  # a noisy total below 0 is answered as 0 samples
    ):
        raise RuntimeError(
            f"the evaluation of run {header.run_id!r} round {header.round} is not the noisy release its DP "
            f"job asks (Gaussian, σ ≥ {needed:g} for ε = {dp.evaluation_epsilon:g}): nothing was sent"
        )
    if answer.privacy is None:  # a site without a budget still reports what the release cost (the run's ε)
        return answer.model_copy(update={"privacy": privacy.gaussian_privacy_charge(float(sigma), dp.delta)})
    return answer


def _charge(
    state: SiteState,
    scope: BudgetScope,
    ledger: privacy.PrivacyLedger,
    header: JobHeader,
    job: RoundJob,
    answer: RoundAnswer,
    planned: PrivacyCharge | None,
) -> tuple[RoundAnswer, dict[str, str] | None]:
    """Record the charge of a trained answer in the ledger (before anything is sent) and return the answer
    carrying it and the ledger's totals, or the refusal reason when the charge does not fit the budget."""
    dp = job.hparams.dp
    assert dp is not None
    if job.mode == "statistics":
        cost: PrivacyCharge | None = privacy.gaussian_privacy_charge(statistics_sigma(dp), dp.delta)
        entry = statistics_charge(dp, run_id=header.run_id, round=header.round, dataset=job.dataset)
    elif job.mode == "evaluate":
        cost = privacy.gaussian_privacy_charge(privacy.evaluation_sigma(dp), dp.delta)
        entry = _evaluation_entry(header, job, dp)
    else:
        cost, entry = _update_charge(header, job, answer, planned, dp)
    reserve = _evaluation_reserve(header, job, dp) if job.mode == "train" else None
    if reserve is not None:
        problem = _reserving_budget_reason(ledger, scope, entry, reserve)
    else:
        problem = _budget_reason(ledger, scope, entry)
    if problem is not None:
        return answer, problem
    ledger = privacy.charge(ledger, entry)
    if reserve is not None:  # the evaluation's release, charged ahead: when it comes it costs nothing more
        ledger = privacy.charge(ledger, reserve)
    state.write_ledger(scope, ledger)
    log.info(
        "site charged run %s round %s (%s) on %s to privacy ledger %s: ε %.4g of %g spent",
        header.run_id,
        header.round,
        entry.release,
        job.dataset,
        scope.ledger,
        privacy.spent(ledger),
        ledger.budget.epsilon,
    )
    status = privacy.budget_status(ledger, scope.ledger)
    return answer.model_copy(update={"privacy": cost, "budget": status}), None


def _evaluation_entry(header: JobHeader, job: RoundJob, dp: DPTraining) -> privacy.Charge:
    """The ledger entry of this evaluation job's release: one Gaussian release at the sigma calibrated from
    the run's evaluation epsilon (:func:`lepton_tasks.core.privacy.evaluation_sigma`)."""
    return privacy.gaussian_charge(
        privacy.evaluation_sigma(dp), run_id=header.run_id, round=header.round, dataset=job.dataset
    )


def _evaluation_reserve(header: JobHeader, job: RoundJob, dp: DPTraining) -> privacy.Charge:
    """The evaluation's release that a train job of the run reserves: the very entry the evaluation job
    (round ``rounds + 1``) will charge (:func:`lepton_tasks.core.privacy.evaluation_charge`)."""
    return privacy.evaluation_charge(dp, run_id=header.run_id, rounds=job.rounds, dataset=job.dataset)


def _reserving_budget_reason(
    ledger: privacy.PrivacyLedger, scope: BudgetScope, entry: privacy.Charge, reserve: privacy.Charge
) -> dict[str, str] | None:
    """Why a train ``entry`` cannot be charged while keeping room for the run's evaluation ``reserve``
    (``None``: both fit, composed with the ledger). A site that trained must be able to evaluate: otherwise
    it would drop out of the evaluation round (and of the union AUC) after spending its DP-SGD budget on the
    run. The refusal names ε spent, asked, reserved, limit and remaining."""
    if (problem := _budget_reason(ledger, scope, entry)) is not None and problem["code"] != (
        RefusalCode.BUDGET_EXHAUSTED
    ):
        return problem  # a ledger conflict or shuffled batches: not a question of room
    what = (
        "this site's privacy budget"
        if scope.ledger == SITE_LEDGER
        else f"the privacy budget of dataset {scope.ledger!r}"
    )
    try:
        new = [c for c in (entry, reserve) if privacy.existing_charge(ledger, c) is None]
    except ValueError as exc:  # the evaluation's round is charged with another sigma
        return _reason(SiteRefusalCode.PRIVACY_LEDGER_CONFLICT, "hparams.dp", f"{what}: {exc}")
    delta, limit = ledger.budget.delta, ledger.budget.epsilon
    total = privacy.epsilon_of([*ledger.entries, *new], delta)
    if total <= limit:
        return None
    spent = privacy.spent(ledger)
    remaining = max(0.0, limit - spent)
    asked = privacy.epsilon_of([entry], delta) if entry in new else 0.0
    reserved = privacy.epsilon_of([reserve], delta) if reserve in new else 0.0
    return {
        **_reason(
            RefusalCode.BUDGET_EXHAUSTED,
            "hparams.dp",
            f"{what} has no room for this job and the run's evaluation: ε spent {spent:.4g}, this job asks "
            f"ε {asked:.4g}, the evaluation reserves ε {reserved:.4g} (round {reserve.round}, σ = "
            f"{reserve.noise_multiplier:.4g}), ε {total:.4g} composed with what is spent; ε limit {limit:g} "
            f"at δ = {delta:g}, ε remaining {remaining:.4g} (σ = {entry.noise_multiplier:g}, "
            f"q = {entry.sampling_rate:.4g}, {entry.steps} steps)",
        ),
        "epsilon_spent": f"{spent:.6g}",
        "epsilon_asked": f"{asked:.6g}",
        "epsilon_reserved": f"{reserved:.6g}",
        "epsilon_limit": f"{limit:g}",
        "epsilon_remaining": f"{remaining:.6g}",
        "delta": f"{delta:g}",
    }


#: what of a train answer's training metrics crosses under secure aggregation: rates and losses only —
#: ``n``, ``positives`` or the training time would give away the site's sample count
SECURE_TRAIN_METRICS: Final = frozenset(
    {"auc", "pr_auc", "accuracy", "log_loss", "loss", "positive_rate", "epochs", "fedprox_mu", "update_norm"}
)


def _without_counts(job: RoundJob, answer: RoundAnswer) -> RoundAnswer:
    """A secure run's answer as it may leave: no sample count (``n_samples`` None; the weighted FedAvg and
    the statistics carry theirs masked, inside the sum); a train answer keeps only
    :data:`SECURE_TRAIN_METRICS` and drops the held-out block of the incoming global model (its histogram
    counts the site's held-out rows; the coordinator does not use it). An evaluation keeps its block: the
    union AUC needs its histogram, whose total is the held-out count (noisy under DP, exact without)."""
    hidden: dict[str, object] = {"n_samples": None}
    if job.mode == "train":
        hidden["metrics"] = {k: v for k, v in answer.metrics.items() if k in SECURE_TRAIN_METRICS}
        hidden["evaluation"] = None
    return answer.model_copy(update=hidden)


def _update_charge(
    header: JobHeader, job: RoundJob, answer: RoundAnswer, planned: PrivacyCharge | None, dp: DPTraining
) -> tuple[PrivacyCharge, privacy.Charge]:
    """The DP-SGD charge of a trained update (the trainer's, else the planned one) and its ledger entry."""
    cost = answer.privacy or planned
    if cost is None:  # no data leaves: the task fails, it is not a refusal
        raise RuntimeError(
            f"the trainer reported no DP-SGD charge for run {header.run_id!r} round {header.round} on "
            f"{job.dataset!r}, which trains under a privacy budget: nothing was sent"
        )
    if (cost.noise_multiplier, cost.l2_clip) != (dp.noise_multiplier, dp.l2_clip):
        raise RuntimeError(
            f"the trainer trained with σ = {cost.noise_multiplier:g}, C = {cost.l2_clip:g}; the job asks "
            f"σ = {dp.noise_multiplier:g}, C = {dp.l2_clip:g}: nothing was sent"
        )
    return cost, privacy.ledger_charge(cost, run_id=header.run_id, round=header.round, dataset=job.dataset)


def run_pending(
    storage: Storage,
    bucket: str,
    *,
    policy: SitePolicy,
    state: SiteState,
    run_trainer: Trainer,
    signer: Signer,
    outbound_log: OutboundLog,
    approvals: Mapping[str, bool] | None = None,
    now: datetime | None = None,
    answer_ttl: timedelta = DEFAULT_ANSWER_TTL,
    sample_count: SampleCount | None = None,
    secagg: SiteExchange | None = None,
) -> list[JobOutcome]:
    """One poll of the site's exchange: :func:`handle_job` on every job key not handled yet (what the site's
    job DAG does for the keys its exchange watcher reports). ``approvals``: key → the human's decision;
    ``sample_count``, ``secagg``: as for :func:`handle_job`."""
    approvals = approvals or {}
    outcomes = []
    for key in poll_jobs(storage, bucket, last_seen=state.read().handled):
        try:
            raw = storage.get_bytes(bucket, key)
        except StorageError as exc:  # removed between the listing and the read: the next poll decides
            log.warning("site %s could not read %s: %s", policy.site, key, exc)
            continue
        outcomes.append(
            handle_job(
                raw,
                key=key,
                policy=policy,
                state=state,
                run_trainer=run_trainer,
                signer=signer,
                storage=storage,
                bucket=bucket,
                outbound_log=outbound_log,
                approved=approvals.get(key),
                now=now,
                answer_ttl=answer_ttl,
                sample_count=sample_count,
                secagg=secagg,
            )
        )
    return outcomes
