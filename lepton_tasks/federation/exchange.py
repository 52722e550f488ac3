"""Coordinator side of a round over the exchange buckets: send signed jobs, collect signed answers.

The coordinator never connects to a site. It writes into each site's exchange bucket (its own object
storage) and reads what the site wrote back:

- :func:`send_round` puts, per site, the global weights blob (``jobs/<run>/<round>/global-<sha256>.weights``)
  and then the sealed :class:`~lepton_tasks.core.messages.RoundJob` that names it by key, size and SHA-256
  (the job is the commit: a site never sees a job whose blob is not there yet). It returns the header of
  every job sent — what the coordinator keeps (XCom) to bind the answers to.
- :func:`collect_answers` lists each site's ``answers/<run>/<round>/`` and ``refusals/<run>/<round>/``,
  opens every message with :meth:`Expectation.for_reply` (the job it sent, the key it read, the site key
  pinned in the :class:`~lepton_tasks.federation.enrollment.SiteRegistry`), validates the payload model,
  reads and checks the update blob an answer references, and returns a :class:`RoundOutcome`: per site
  *accepted* (the answer and its update bytes), *refused* (the site's signed reasons), *rejected* (reason
  code and message of the reply that failed), *missing* (nothing valid before the job expired — with a
  check of whether the job the coordinator wrote is still there: "replaced" or "removed" after it was
  sent) or *pending* (nothing yet, the job has not expired).

One bad site never fails the round: a storage error, a forged or tampered reply, a malformed payload or a
missing blob is that site's outcome, with its reason (:attr:`RoundOutcome.excluded`). Errors of the
coordinator's own making (a site not enrolled or not pinned, an unknown blob target) raise in
:func:`send_round`, before anything is written.

Under secure aggregation (``secure_aggregation=True``: the job's ``secure_aggregation`` is set) a train answer
carries NO update (the site keeps it until it masks it; one that does carry an update is rejected, never
used), and the round's folders also hold the aggregation's phase replies (``lepton-secagg-*`` payloads,
``.masked`` blobs, refusals of a phase job): those answer other jobs of the coordinator and are judged by
:mod:`lepton_tasks.federation.secagg_round`, so here they are skipped — never a rejection of the site.

Precedence when a site wrote several replies to one job: a valid refusal wins (the site decides); else the
earliest valid answer (a second one — a site task retried after its put — is a warning); else the first
rejected reply. Replies that fail beside a valid one are warnings, so junk written into a site's bucket by
someone else cannot exclude it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import numpy as np
from minio.error import S3Error

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core import weights
from lepton_tasks.core.exchange import (
    AnswerHeader,
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RefusalHeader,
    RejectReason,
    canonical_json,
    make_header,
    object_key,
    open_message,
    parse_object_key,
    prefix_for,
    seal,
    sha256_hex,
)
from lepton_tasks.core.messages import BlobRef, MessageError, RoundAnswer, RoundJob, RoundRefusal, dump, load
from lepton_tasks.core.secagg_messages import (
    MASKED_SUFFIX,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggShares,
)
from lepton_tasks.core.signatures import PublicKey, Signer, verify
from lepton_tasks.federation.enrollment import EnrollmentError, SiteEntry, SiteRegistry

__all__ = [
    "ALL_SITES",
    "DEFAULT_JOB_TTL",
    "UPDATE_SUFFIX",
    "Rejection",
    "RoundOutcome",
    "SiteOutcome",
    "SiteStatus",
    "collect_answers",
    "global_weights_key",
    "send_round",
    "update_key",
]

log = logging.getLogger(__name__)

#: the ``blobs`` key whose bytes go to every site that has no blob of its own
ALL_SITES: Final = "*"
DEFAULT_JOB_TTL: Final = timedelta(hours=24)
WEIGHTS_SUFFIX: Final = ".weights"
UPDATE_SUFFIX: Final = ".update"
#: payload schemas of the secure aggregation's phase answers (replies to the phase jobs, not the round's)
SECAGG_REPLY_SCHEMAS: Final = frozenset(
    m.payload_schema for m in (SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal)
)
REPLY_SCHEMAS: Final = {
    MessageKind.ANSWER: RoundAnswer.payload_schema,
    MessageKind.REFUSAL: RoundRefusal.payload_schema,
}


def global_weights_key(run_id: str, round: int, sha256: str) -> str:
    """Where the coordinator puts a round's global weights in a site's bucket (beside the job)."""
    return f"{prefix_for(MessageKind.JOB, run_id, round)}global-{sha256}{WEIGHTS_SUFFIX}"


def update_key(run_id: str, round: int, answer_id: uuid.UUID) -> str:
    """Where a site puts the update blob of its answer ``answer_id`` (under ``answers/``, which its outbound
    log reconciles)."""
    return f"{prefix_for(MessageKind.ANSWER, run_id, round)}{answer_id}{UPDATE_SUFFIX}"


# ----------------------------------------------------------------------------------------------------
# send
# ----------------------------------------------------------------------------------------------------


def _sendable(entries: Mapping[str, SiteEntry], site: str, consortium: str) -> SiteEntry:
    entry = entries.get(site)
    if entry is None:
        raise EnrollmentError(f"site {site!r} is not enrolled; enrolled: {', '.join(sorted(entries))}")
    if entry.consortium != consortium:
        raise EnrollmentError(f"site {site!r} is enrolled in {entry.consortium!r}, not {consortium!r}")
    entry.pinned_key()  # raises when the site's key is not pinned: its answers could not be verified
    return entry


def send_round(
    storage: Storage,
    signer: Signer,
    registry: SiteRegistry,
    *,
    consortium: str,
    run_id: str,
    round: int,
    jobs: Mapping[str, RoundJob],
    blobs: Mapping[str, bytes] | None = None,
    ttl: timedelta = DEFAULT_JOB_TTL,
    now: datetime | None = None,
) -> dict[str, JobHeader]:
    """Write each site's global weights and sealed job into its exchange bucket; return the job headers.

    ``blobs``: site → global weights bytes, or :data:`ALL_SITES` → the bytes for every site without its own.
    The job's ``global_weights`` is set here (key, size, SHA-256) — a job that names a blob while none is
    given is an error. Every site must be enrolled in ``consortium`` with its key pinned; this is checked
    for all sites before anything is written. The job expires ``ttl`` after ``now``: the round's deadline.
    """
    blobs = dict(blobs or {})
    entries = registry.load()
    targets = {site: _sendable(entries, site, consortium) for site in sorted(jobs)}
    if stray := sorted(set(blobs) - set(jobs) - {ALL_SITES}):
        raise ValueError(f"blobs for sites that get no job: {', '.join(stray)}")
    for site, job in jobs.items():
        if job.global_weights is not None and blobs.get(site, blobs.get(ALL_SITES)) is None:
            raise ValueError(f"the job for {site!r} names global weights, but no blob was given for it")
    now = (now or datetime.now(UTC)).astimezone(UTC)

    sent: dict[str, JobHeader] = {}
    for site, entry in targets.items():
        job = jobs[site]
        blob = blobs.get(site, blobs.get(ALL_SITES))
        if blob is not None:
            digest = sha256_hex(blob)
            ref = BlobRef(key=global_weights_key(run_id, round, digest), sha256=digest, size=len(blob))
            storage.put_bytes(entry.bucket, ref.key, blob)
            job = job.model_copy(update={"global_weights": ref})
        payload = canonical_json(dump(job))
        header = make_header(
            MessageKind.JOB,
            consortium=consortium,
            run_id=run_id,
            round=round,
            site=site,
            bucket=entry.bucket,
            payload=payload,
            payload_schema=RoundJob.payload_schema,
            ttl=ttl,
            now=now,
        )
        assert isinstance(header, JobHeader)
        storage.put_bytes(
            entry.bucket, object_key(header), seal(header, payload, signer), content_type="application/json"
        )
        sent[site] = header
    return sent


# ----------------------------------------------------------------------------------------------------
# collect
# ----------------------------------------------------------------------------------------------------


class SiteStatus(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    REJECTED = "rejected"
    MISSING = "missing"
    PENDING = "pending"


@dataclass(frozen=True)
class Rejection:
    """Why a site's reply (or the site) was rejected: a :class:`RejectReason` value — or ``not_enrolled``,
    ``not_pinned``, ``unreadable`` — the reply's key, the field at fault and a sentence for humans."""

    reason_code: str
    message: str
    object_key: str | None = None
    field: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "reason_code": self.reason_code,
            "object_key": self.object_key,
            "field": self.field,
            "message": self.message,
        }

    def describe(self) -> str:
        where = f", {self.object_key}" if self.object_key else ""
        return f"{self.reason_code}{where}: {self.message}"


@dataclass(frozen=True)
class SiteOutcome:
    """One site's result for the round."""

    site: str
    status: SiteStatus
    job: JobHeader
    reply: AnswerHeader | RefusalHeader | None = None
    answer: RoundAnswer | None = None
    #: the update blob's bytes (accepted train answers), checked against the signed SHA-256
    update: bytes | None = None
    #: the site's refusal reasons (code, field, message)
    reasons: tuple[dict[str, str], ...] = ()
    rejection: Rejection | None = None
    #: why the site is not in the round, for the report (``None`` when accepted or pending)
    reason: str | None = None
    warnings: tuple[str, ...] = ()
    #: message ids of every valid reply (the caller adds them to its seen ids)
    reply_ids: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True)
class RoundOutcome:
    run_id: str
    round: int
    sites: Mapping[str, SiteOutcome] = field(default_factory=dict)

    def with_status(self, status: SiteStatus) -> dict[str, SiteOutcome]:
        return {site: out for site, out in sorted(self.sites.items()) if out.status is status}

    @property
    def accepted(self) -> dict[str, SiteOutcome]:
        return self.with_status(SiteStatus.ACCEPTED)

    @property
    def excluded(self) -> dict[str, str]:
        """Site → why it is not in this round (refused, rejected, missing), for the run report."""
        return {
            site: out.reason or out.status.value
            for site, out in sorted(self.sites.items())
            if out.status in (SiteStatus.REFUSED, SiteStatus.REJECTED, SiteStatus.MISSING)
        }

    @property
    def pending(self) -> list[str]:
        return sorted(self.with_status(SiteStatus.PENDING))

    @property
    def complete(self) -> bool:
        """Every site has an outcome (none pending): the round can be aggregated."""
        return not self.pending

    @property
    def reply_ids(self) -> set[uuid.UUID]:
        """Message ids of the valid replies read in this round (add them to the coordinator's seen ids)."""
        return {mid for out in self.sites.values() for mid in out.reply_ids}

    def updates(self) -> list[tuple[str, list[np.ndarray], int]]:
        """``(site, weights, n_samples)`` of each accepted answer with an update, for ``aggregate.fedavg``."""
        out = []
        for site, res in self.accepted.items():
            # an update's answer carries its count (``_update_blob`` rejects one without)
            if res.update is not None and res.answer is not None and res.answer.n_samples is not None:
                arrays, _meta = weights.loads(res.update)
                out.append((site, arrays, res.answer.n_samples))
        return out

    def summary(self) -> dict[str, dict[str, Any]]:
        """JSON-ready per-site outcome (no blobs): what a task returns to XCom and the report reads."""
        return {
            site: {
                "status": out.status.value,
                "reason": out.reason,
                "rejection": out.rejection.to_dict() if out.rejection else None,
                "refusal": list(out.reasons),
                "n_samples": out.answer.n_samples if out.answer else None,
                "warnings": list(out.warnings),
            }
            for site, out in sorted(self.sites.items())
        }


def _check_weights(data: bytes) -> None:
    weights.loads(data)


def _job_still_there(storage: Storage, job: JobHeader, coordinator_key: str | PublicKey | None) -> str | None:
    """``None`` when the job the coordinator wrote is still in the bucket as sent (same header and payload,
    and — given ``coordinator_key`` — a signature that verifies); else what happened to it."""
    key = object_key(job)
    try:
        if not storage.exists(job.bucket, key):
            return f"the job sent ({key}) is no longer in {job.bucket}: removed after it was sent"
        raw = storage.get_bytes(job.bucket, key)
    except (S3Error, StorageError):
        return None  # no diagnosis, not a verdict
    try:
        doc = json.loads(raw)
        same = (
            doc["header"] == job.model_dump(mode="json")
            and sha256_hex(base64.b64decode(doc["payload"], validate=True)) == job.payload_sha256
        )
        if same and coordinator_key is not None:
            key_b64 = (
                coordinator_key.public_key_b64 if isinstance(coordinator_key, PublicKey) else coordinator_key
            )
            same = isinstance(doc["signature"], str) and verify(
                key_b64, canonical_json(doc["header"]), doc["signature"]
            )
    except (ValueError, KeyError, TypeError, binascii.Error):
        same = False
    return None if same else f"the job sent ({key}) was replaced in {job.bucket} after it was sent"


def _update_blob(
    storage: Storage,
    job: JobHeader,
    key: str,
    answer: RoundAnswer,
    validate_update: Callable[[bytes], None] | None,
    secure_aggregation: bool = False,
) -> tuple[bytes | None, Rejection | None]:
    ref = answer.update
    if secure_aggregation:
        if ref is not None or answer.statistics is not None:
            return None, Rejection(
                RejectReason.MALFORMED.value,
                "under secure aggregation an answer carries no update or statistics (only their masked sum "
                "crosses); this one does, so it is not used",
                key,
                "payload.update" if ref is not None else "payload.statistics",
            )
        return None, None
    if ref is None:
        if answer.mode == "train":
            return None, Rejection(
                RejectReason.MALFORMED.value, "a train answer carries no update", key, "payload.update"
            )
        return None, None
    if answer.n_samples is None or answer.n_samples <= 0:  # None: only a secure answer may hide it
        return None, Rejection(
            RejectReason.MALFORMED.value,
            f"an update from {answer.n_samples if answer.n_samples is not None else 'an unstated number of'} "
            "samples cannot be weighted",
            key,
            "payload.n_samples",
        )
    folder = prefix_for(MessageKind.ANSWER, job.run_id, job.round)
    rest = ref.key[len(folder) :] if ref.key.startswith(folder) else ""
    if not rest or "/" in rest or not rest.endswith(UPDATE_SUFFIX):
        return None, Rejection(
            RejectReason.MOVED.value,
            f"the update {ref.key!r} is not an update blob of this round ({folder}*{UPDATE_SUFFIX})",
            key,
            "payload.update.key",
        )
    try:
        present = storage.exists(job.bucket, ref.key)
        data = storage.get_bytes(job.bucket, ref.key) if present else b""
    except (S3Error, StorageError) as exc:
        return None, Rejection("unreadable", f"cannot read the update {ref.key}: {exc}", key)
    if not present:
        return None, Rejection(
            RejectReason.TAMPERED_PAYLOAD.value,
            f"the update {ref.key} the answer names is not in the bucket",
            key,
            "payload.update.key",
        )
    if len(data) != ref.size or sha256_hex(data) != ref.sha256:
        return None, Rejection(
            RejectReason.TAMPERED_PAYLOAD.value,
            f"the update {ref.key} ({len(data)} bytes, sha256 {sha256_hex(data)[:12]}…) is not the one the "
            f"signed answer names ({ref.size} bytes, sha256 {ref.sha256[:12]}…)",
            key,
            "payload.update.sha256",
        )
    if validate_update is not None:
        try:
            validate_update(data)
        except ValueError as exc:
            return None, Rejection(
                RejectReason.MALFORMED.value,
                f"the update {ref.key} is not usable: {exc}",
                key,
                "payload.update",
            )
    return data, None


def _refusal_text(reasons: tuple[dict[str, str], ...]) -> str:
    parts = [f"{r.get('code', '?')} ({r.get('field', '?')}): {r.get('message', '')}" for r in reasons]
    return "refused by the site: " + "; ".join(parts)


def _collect_site(
    storage: Storage,
    site: str,
    job: JobHeader,
    entry: SiteEntry | None,
    *,
    seen_ids: Container[uuid.UUID],
    now: datetime,
    validate_update: Callable[[bytes], None] | None,
    coordinator_key: str | PublicKey | None,
    secure_aggregation: bool = False,
) -> SiteOutcome:
    def rejected(rejection: Rejection, warnings: list[str] | None = None) -> SiteOutcome:
        return SiteOutcome(
            site,
            SiteStatus.REJECTED,
            job,
            rejection=rejection,
            reason=f"its reply was rejected ({rejection.describe()})",
            warnings=tuple(warnings or ()),
        )

    if entry is None:
        return rejected(Rejection("not_enrolled", f"site {site!r} is no longer enrolled"))
    try:
        public_key = entry.pinned_key()
    except EnrollmentError as exc:
        return rejected(Rejection("not_pinned", str(exc)))
    if entry.bucket != job.bucket:
        return rejected(
            Rejection(
                "moved", f"the site's exchange bucket is now {entry.bucket}, the job went to {job.bucket}"
            )
        )
    try:
        keys = sorted(
            obj.key
            for kind in REPLY_SCHEMAS
            for obj in storage.list(job.bucket, prefix_for(kind, job.run_id, job.round))
        )
    except (S3Error, StorageError) as exc:
        return rejected(Rejection("unreadable", f"cannot list {job.bucket}: {exc}"))

    answers: list[tuple[AnswerHeader, RoundAnswer, bytes | None]] = []
    refusals: list[tuple[RefusalHeader, RoundRefusal]] = []
    rejections: list[Rejection] = []
    warnings: list[str] = []
    update_folder = prefix_for(MessageKind.ANSWER, job.run_id, job.round)
    schemas = frozenset(REPLY_SCHEMAS.values()) | (
        SECAGG_REPLY_SCHEMAS if secure_aggregation else frozenset()
    )
    for key in keys:
        try:
            parse_object_key(key)
        except ValueError:
            a_blob = key.startswith(update_folder) and (
                key.endswith(UPDATE_SUFFIX) or (secure_aggregation and key.endswith(MASKED_SUFFIX))
            )
            if not a_blob:
                warnings.append(f"unexpected object {key} in the site's reply folders (ignored)")
            continue  # update blobs are read through the answer that names them
        try:
            raw = storage.get_bytes(job.bucket, key)
        except StorageError as exc:
            warnings.append(f"cannot read {key}: {exc}")
            continue
        try:
            header, payload = open_message(
                raw,
                expected=Expectation.for_reply(job, object_key=key, payload_schemas=schemas),
                public_key=public_key,
                seen_ids=seen_ids,
                now=now,
            )
        except MessageRejected as exc:
            if secure_aggregation and exc.reason_code is RejectReason.UNBOUND_ANSWER:
                continue  # signed by the site, bound to another job: a phase reply of the aggregation
            rejections.append(Rejection(exc.reason_code.value, exc.message, key, exc.field))
            continue
        if header.payload_schema != REPLY_SCHEMAS[header.kind]:
            rejections.append(
                Rejection(
                    RejectReason.WRONG_PAYLOAD_SCHEMA.value,
                    f"a {header.kind.value} cannot carry {header.payload_schema!r}",
                    key,
                    "header.payload_schema",
                )
            )
            continue
        where = f"s3://{job.bucket}/{key}"
        try:
            if isinstance(header, RefusalHeader):
                refusals.append((header, load(RoundRefusal, payload, where=where)))
                continue
            answer = load(RoundAnswer, payload, where=where)
        except MessageError as exc:
            rejections.append(Rejection(RejectReason.MALFORMED.value, str(exc), key, "payload"))
            continue
        assert isinstance(header, AnswerHeader)
        blob, problem = _update_blob(storage, job, key, answer, validate_update, secure_aggregation)
        if problem is not None:
            rejections.append(problem)
            continue
        answers.append((header, answer, blob))

    reply_ids = tuple([h.message_id for h, _ in refusals] + [h.message_id for h, _, _ in answers])
    if refusals or answers:
        warnings += [f"a reply was rejected beside a valid one ({r.describe()})" for r in rejections]
    if refusals:
        refusal_header, refusal = min(refusals, key=lambda r: (r[0].created_at, str(r[0].message_id)))
        reasons = tuple(refusal.reasons)
        if answers:
            warnings.append("the site also answered; its refusal stands")
        return SiteOutcome(
            site,
            SiteStatus.REFUSED,
            job,
            reply=refusal_header,
            reasons=reasons,
            reason=_refusal_text(reasons),
            warnings=tuple(warnings),
            reply_ids=reply_ids,
        )
    if answers:
        answer_header, answer, blob = min(answers, key=lambda a: (a[0].created_at, str(a[0].message_id)))
        if len(answers) > 1:
            warnings.append(
                f"{len(answers)} valid answers; the earliest ({answer_header.message_id}) is used"
            )
        return SiteOutcome(
            site,
            SiteStatus.ACCEPTED,
            job,
            reply=answer_header,
            answer=answer,
            update=blob,
            warnings=tuple(warnings),
            reply_ids=reply_ids,
        )
    if rejections:
        others = [f"another reply was rejected too ({r.describe()})" for r in rejections[1:]]
        return rejected(rejections[0], warnings + others)
    if now < job.expires_at:
        return SiteOutcome(site, SiteStatus.PENDING, job, warnings=tuple(warnings))
    reason = f"no answer or refusal before the job expired at {job.expires_at.isoformat()}"
    if diagnosis := _job_still_there(storage, job, coordinator_key):
        reason += f"; {diagnosis}"
    return SiteOutcome(site, SiteStatus.MISSING, job, reason=reason, warnings=tuple(warnings))


def collect_answers(
    storage: Storage,
    registry: SiteRegistry,
    sent: Mapping[str, JobHeader],
    *,
    seen_ids: Container[uuid.UUID],
    now: datetime | None = None,
    validate_update: Callable[[bytes], None] | None = _check_weights,
    coordinator_key: str | PublicKey | None = None,
    secure_aggregation: bool = False,
) -> RoundOutcome:
    """Read every site's replies to the jobs ``sent`` (one run, one round) and judge them; never raises for
    one site's fault. ``seen_ids``: message ids of replies accepted in EARLIER rounds (this function adds
    nothing; :attr:`RoundOutcome.reply_ids` are the ones to add once the round is aggregated — calling it
    again for the same round, as a polling trigger does, gives the same outcome). ``validate_update``
    checks an update's bytes (default: a ``core.weights`` archive); ``ValueError`` rejects the answer.
    ``coordinator_key`` (the coordinator's own public key) lets the diagnosis of a missing site also tell a
    job whose signature was swapped from the one sent. ``secure_aggregation``: the round's jobs run under
    secure aggregation (module docstring: answers without update, the phases' replies skipped)."""
    if not sent:
        raise ValueError("no jobs: nothing to collect")
    rounds = {(h.run_id, h.round) for h in sent.values()}
    if len(rounds) != 1:
        raise ValueError(f"the jobs sent span several runs/rounds: {sorted(rounds)}")
    if bad := sorted(site for site, h in sent.items() if h.site != site):
        raise ValueError(f"sent headers filed under the wrong site: {', '.join(bad)}")
    ((run_id, round_),) = rounds
    now = (now or datetime.now(UTC)).astimezone(UTC)
    entries = registry.load()
    outcomes = {}
    for site, job in sorted(sent.items()):
        outcome = _collect_site(
            storage,
            site,
            job,
            entries.get(site),
            seen_ids=seen_ids,
            now=now,
            validate_update=validate_update,
            coordinator_key=coordinator_key,
            secure_aggregation=secure_aggregation,
        )
        if outcome.reason:
            log.warning("round %s/%s: site %s excluded: %s", run_id, round_, site, outcome.reason)
        outcomes[site] = outcome
    return RoundOutcome(run_id, round_, outcomes)
