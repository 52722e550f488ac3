"""The site's side of secure aggregation through its exchange bucket: one function per phase.

Each function finds the coordinator's signed job of its phase in ``jobs/<run>/<round>/`` of the site's
exchange bucket, opens it (:func:`lepton_tasks.core.secagg_messages.open_payload`: the coordinator's key
pinned in the site's policy, the site's own name and bucket, the run and round the site is in, the ids it
already accepted, the aggregation it joined), runs the protocol's step
(:mod:`lepton_tasks.federation.secagg`), and writes its sealed answer back — each object appended to the
site's outbound log before the put, under ``answers/`` (or a signed refusal under ``refusals/``)::

    join             SecAggSetup  → fresh X25519 keys c, s and seed b        → SecAggKeys
    share            SecAggRoster → Shamir shares of b and s_sk, encrypted   → SecAggShares
    mask_update /    SecAggInbox  → decrypt the shares, y = x + masks         → SecAggMasked (+ .masked blob)
    mask_statistics
    reveal           SecAggSurvivors → a share of b (survivor) or of s_sk      → SecAggReveal
                                   (dropout) per neighbour, once

A job that does not open (forged, tampered, moved, replayed, expired) is *rejected*: the site writes
nothing and returns the reason (why no signed reply: ``site.jobs``). An authentic job the site will not
follow (an invalid setup, a roster without its own keys, a share addressed to another site or that does not
decrypt, survivors it never shared with, an input outside the layout) is *refused* with the exchange's
signed :class:`~lepton_tasks.core.messages.RoundRefusal` and the site leaves the aggregation; the
coordinator treats it as a dropout.

**The round's secrets stay at the site.** ``c_sk``, ``s_sk``, ``b`` and the shares received live in one
:class:`SiteAggregation` file per (run, round, purpose) in the site's own data directory (beside its state,
never in the exchange bucket), mode 0600, written atomically under a lock, and **encrypted at rest** with
the site's Vault: :class:`VaultSecretBox` is Tink's ``KmsEnvelopeAead`` (a fresh AES-256-GCM data key per
write, wrapped by the site's ``aes256-gcm96`` transit key) — the construction of
:mod:`lepton_tasks.adapters.envelope` for staged data, here over a few hundred bytes, with associated data
binding the site, run, round and purpose, so a file copied to another aggregation does not decrypt. Why not
a plain 0600 file like the state and the privacy ledger: these keys unmask the site's update, so a copy of
the data directory (a backup, a stolen disk) must not be enough; Vault's audit log also records every use.
After the reveal the secrets are erased from the file; what remains (ids, phase, the hash of the input) is
what stops the site from masking the same round's input twice.

**One masked input per round.** Two masked inputs of the same values under different aggregations would let
the coordinator subtract sums; two different inputs under the same masks reveal their difference. So the
site refuses a second aggregation of a (run, round, purpose) once it has masked, and a retried
``mask_*`` re-sends only the SAME vector (the SHA-256 of the ring input and of the masked blob are recorded
before anything is sent). Each phase is idempotent: a retry after a crash re-puts the prepared objects byte
for byte; a call after the reply went out returns ``done``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import numpy as np
from pydantic import UUID4, BaseModel, ConfigDict, Field, ValidationError

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.exchange import (
    RUN_ID_PATTERN,
    Expectation,
    JobHeader,
    MessageKind,
    MessageRejected,
    RejectReason,
    object_key,
    parse_object_key,
    prefix_for,
    sha256_hex,
)
from lepton_tasks.core.features import SufficientStats
from lepton_tasks.core.files import write_private
from lepton_tasks.core.messages import BlobRef
from lepton_tasks.core.outbound_log import OutboundLog, OutboundRecord
from lepton_tasks.core.secagg_messages import (
    AdvertisedKey,
    B64Bytes,
    EncryptedShareModel,
    Purpose,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggPayload,
    SecAggReveal,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSurvivors,
    ShareModel,
    masked_key,
    open_payload,
    seal_answer,
    seal_refusal,
)
from lepton_tasks.core.signatures import PublicKey, Signer
from lepton_tasks.core.site_policy import SitePolicy
from lepton_tasks.federation import secagg
from lepton_tasks.federation.secagg_round import Phase, StatisticsCodec, UpdateCodec, round_config

if TYPE_CHECKING:
    import hvac

__all__ = [
    "DEFAULT_ANSWER_TTL",
    "HeldInput",
    "SecAggRefusalCode",
    "SecAggStateError",
    "SecretBox",
    "SiteAggregation",
    "SiteExchange",
    "SiteStep",
    "SiteStepStatus",
    "VaultSecretBox",
    "held_input",
    "hold_input",
    "join",
    "mask_statistics",
    "mask_update",
    "read_aggregation",
    "release_input",
    "reveal",
    "share",
]

log = logging.getLogger(__name__)

DEFAULT_ANSWER_TTL: Final = timedelta(days=7)
STATE_MODE: Final = 0o600
_ORDER: Final = (Phase.KEYS, Phase.SHARES, Phase.MASKED, Phase.REVEAL)
_JOB: Final[dict[Phase, type[SecAggPayload]]] = {
    Phase.KEYS: SecAggSetup,
    Phase.SHARES: SecAggRoster,
    Phase.MASKED: SecAggInbox,
    Phase.REVEAL: SecAggSurvivors,
}
_OTHER_JOBS: Final = (RejectReason.WRONG_PAYLOAD_SCHEMA,)  # other jobs in the folder: not this phase's


class SecAggStateError(RuntimeError):
    """The site's secure-aggregation file cannot be used safely (mode, content, decryption); names it."""


class SecAggRefusalCode(StrEnum):
    """Why a site leaves an aggregation (the ``code`` of its signed refusal)."""

    INVALID_SETUP = "secagg_invalid_setup"  # parameters the protocol or the site's own checks reject
    INPUT_ALREADY_MASKED = "secagg_input_already_masked"  # a second aggregation of an input already masked
    ROSTER_INCONSISTENT = "secagg_roster_inconsistent"  # the roster lacks or alters this site's keys
    SHARE_REJECTED = "secagg_share_rejected"  # a share addressed elsewhere, not decrypting, or missing
    INPUT_REJECTED = "secagg_input_rejected"  # the site's input does not fit the aggregation's layout
    SURVIVORS_INCONSISTENT = "secagg_survivors_inconsistent"  # survivors the site cannot reveal for


# ----------------------------------------------------------------------------------------------------
# secrets at rest
# ----------------------------------------------------------------------------------------------------


class SecretBox(Protocol):
    """Authenticated encryption of the site's aggregation file (:class:`VaultSecretBox` is the real one)."""

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes: ...


class VaultSecretBox:
    """Tink ``KmsEnvelopeAead(AES256_GCM)`` under the site's Vault transit key ``key_name`` (an
    ``aes256-gcm96`` key the site's token may encrypt and decrypt with): a fresh data key per write, wrapped
    by Vault; the key never leaves Vault."""

    def __init__(self, client: hvac.Client, key_name: str, *, transit_mount: str = "transit") -> None:
        from tink import aead
        from tink.integration import hcvault

        aead.register()
        self.key_name = key_name
        self._aead = aead.KmsEnvelopeAead(
            aead.aead_key_templates.AES256_GCM, hcvault.new_aead(f"{transit_mount}/keys/{key_name}", client)
        )

    def __repr__(self) -> str:  # the client (and its token) stays out of reprs and logs
        return f"VaultSecretBox(key_name={self.key_name!r})"

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        import tink

        try:
            out: bytes = self._aead.encrypt(plaintext, associated_data)
        except tink.TinkError as exc:
            raise SecAggStateError(f"cannot encrypt with Vault key {self.key_name}: {exc}") from exc
        return out

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        import tink

        try:
            out: bytes = self._aead.decrypt(ciphertext, associated_data)
        except tink.TinkError as exc:
            raise SecAggStateError(
                f"cannot decrypt with Vault key {self.key_name}: the file was tampered with, moved, or "
                f"the key is not this site's ({exc})"
            ) from exc
        return out


class ReceivedModel(BaseModel):
    """The shares of one neighbour's ``b`` and ``s_sk`` this site holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    b: ShareModel
    s_sk: ShareModel


class Outgoing(BaseModel):
    """An object the site prepared for its bucket (put again byte for byte on a retry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    kind: MessageKind
    message_id: UUID4
    sha256: str
    size: int
    #: the object's bytes; ``None`` for the masked vector, recomputed from the input on a retry
    data: B64Bytes | None = None


class SiteAggregation(BaseModel):
    """The site's record of one aggregation (encrypted at rest: it holds the round's secrets until the
    reveal). ``phase``: the last phase the site prepared a reply for; ``sent``: that reply is in the
    bucket; ``status``: ``active``, ``refused`` (the site left) or ``done`` (revealed; secrets erased)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    site: str
    run_id: str
    round: int
    purpose: Purpose
    aggregation_id: UUID4
    setup: SecAggSetup
    phase: Phase
    sent: bool = False
    status: Literal["active", "refused", "done"] = "active"
    #: ids of every coordinator job the site accepted for this (run, round, purpose)
    seen: set[UUID4] = Field(default_factory=set)
    c_sk: B64Bytes | None = Field(None, repr=False)
    s_sk: B64Bytes | None = Field(None, repr=False)
    b: B64Bytes | None = Field(None, repr=False)
    roster: list[AdvertisedKey] = Field(default_factory=list)
    shared: list[str] = Field(default_factory=list)
    received: dict[str, ReceivedModel] = Field(default_factory=dict, repr=False)
    #: SHA-256 of the ring input masked (set before the masked vector is sent)
    input_sha256: str | None = None
    outbox: list[Outgoing] = Field(default_factory=list, repr=False)

    def secrets(self) -> secagg.SiteSecrets:
        if self.c_sk is None or self.s_sk is None or self.b is None:
            raise SecAggStateError(f"the secrets of aggregation {self.aggregation_id} were erased")
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return secagg.SiteSecrets(
            self.site,
            X25519PrivateKey.from_private_bytes(self.c_sk),
            X25519PrivateKey.from_private_bytes(self.s_sk),
            self.b,
        )

    def advertised(self) -> dict[str, secagg.AdvertisedKeys]:
        return {k.site: secagg.AdvertisedKeys(k.site, k.c_pk, k.s_pk) for k in self.roster}

    def received_shares(self) -> dict[str, secagg.ReceivedShare]:
        return {
            u: secagg.ReceivedShare(
                u, secagg.Share(r.b.index, r.b.value), secagg.Share(r.s_sk.index, r.s_sk.value)
            )
            for u, r in self.received.items()
        }

    def erase(self) -> None:
        """Forget the round's secrets (the reveal went out, or the site left)."""
        self.c_sk = self.s_sk = self.b = None
        self.received = {}


# ----------------------------------------------------------------------------------------------------
# the site's exchange and its files
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteExchange:
    """What the site's phases need: its exchange (bucket-scoped storage), its signer, the coordinator key
    pinned in its policy, its outbound log, and where (and under which Vault key) it keeps its secrets."""

    site: str
    consortium: str
    bucket: str
    storage: Storage
    signer: Signer
    coordinator_key: PublicKey | str
    outbound_log: OutboundLog
    box: SecretBox
    state_dir: Path
    answer_ttl: timedelta = DEFAULT_ANSWER_TTL
    #: the fewest planned sites the site takes part with (the protocol's own minimum is 3)
    min_sites: int = 3

    @classmethod
    def from_policy(
        cls,
        policy: SitePolicy,
        *,
        storage: Storage,
        bucket: str,
        signer: Signer,
        outbound_log: OutboundLog,
        box: SecretBox,
        state_dir: Path,
        answer_ttl: timedelta = DEFAULT_ANSWER_TTL,
    ) -> SiteExchange:
        """The site's exchange under its policy: its name, consortium, pinned coordinator key, minimum."""
        return cls(
            site=policy.site,
            consortium=policy.consortium,
            bucket=bucket,
            storage=storage,
            signer=signer,
            coordinator_key=policy.coordinator.pinned_key(),
            outbound_log=outbound_log,
            box=box,
            state_dir=state_dir,
            answer_ttl=answer_ttl,
            min_sites=max(3, policy.min_partners),
        )

    @property
    def root(self) -> Path:
        return self.state_dir / "secagg"

    def path(self, run_id: str, round_: int, purpose: Purpose) -> Path:
        """The file of one aggregation (``run_id`` must be a valid run id: it names a directory)."""
        if not re.fullmatch(RUN_ID_PATTERN, run_id) or purpose not in ("update", "statistics"):
            raise ValueError(f"not a run id and purpose: {run_id!r}, {purpose!r}")
        return self.root / run_id / f"{round_:04d}-{purpose}.secagg"

    def associated_data(self, run_id: str, round_: int, purpose: Purpose) -> bytes:
        return (
            f"lepton/secagg-state/v1|site={self.site}|run={run_id}|round={round_}|purpose={purpose}".encode()
        )


@contextmanager
def _locked(ctx: SiteExchange) -> Iterator[None]:
    ctx.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(ctx.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, STATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(ctx: SiteExchange, run_id: str, round_: int, purpose: Purpose) -> SiteAggregation | None:
    path = ctx.path(run_id, round_, purpose)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecAggStateError(f"{path}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise SecAggStateError(f"{path}: must be a regular file of mode 600 (is {st.st_mode & 0o777:o})")
        raw = f.read()
    plain = ctx.box.decrypt(raw, ctx.associated_data(run_id, round_, purpose))
    try:
        doc = SiteAggregation.model_validate_json(plain)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SecAggStateError(f"{path}: not a site aggregation (field {err['loc']}: {err['msg']})") from None
    if (doc.site, doc.run_id, doc.round, doc.purpose) != (ctx.site, run_id, round_, purpose):
        raise SecAggStateError(f"{path}: holds another aggregation")
    return doc


def _save(ctx: SiteExchange, doc: SiteAggregation) -> None:
    data = ctx.box.encrypt(
        doc.model_dump_json().encode(), ctx.associated_data(doc.run_id, doc.round, doc.purpose)
    )
    write_private(ctx.path(doc.run_id, doc.round, doc.purpose), data, STATE_MODE)


def read_aggregation(
    ctx: SiteExchange, *, run_id: str, round: int, purpose: Purpose
) -> SiteAggregation | None:
    """The site's decrypted record of its (run, round, purpose) aggregation (``None``: never joined one)."""
    with _locked(ctx):
        return _load(ctx, run_id, round, purpose)


# ----------------------------------------------------------------------------------------------------
# the round's input, held at the site until it is masked
# ----------------------------------------------------------------------------------------------------


class HeldInput(BaseModel):
    """What a site trained (or counted) for a round under secure aggregation and keeps until it masks it:
    the update archive (``core.weights``) or the statistics' JSON, the job it answered (a setup must be
    bound to that job), its sample count and the contract it follows. Encrypted at rest like the round's
    secrets (:class:`VaultSecretBox`); erased once the site revealed its shares."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    site: str
    run_id: str
    round: int
    purpose: Purpose
    #: the round job this input answers (``core.exchange.JobRef`` fields)
    job_message_id: UUID4
    job_payload_sha256: str
    n_samples: int = Field(ge=0)
    dataset: str
    contract_sha256: str
    data: B64Bytes


def _held_path(ctx: SiteExchange, run_id: str, round_: int) -> Path:
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return ctx.root / run_id / f"{round_:04d}.held"


def _held_ad(ctx: SiteExchange, run_id: str, round_: int) -> bytes:
    return f"lepton/secagg-held/v1|site={ctx.site}|run={run_id}|round={round_}".encode()


def hold_input(ctx: SiteExchange, held: HeldInput) -> Path:
    """Keep ``held`` at the site (encrypted, mode 0600, atomic) until the round's aggregation masks it.
    Replacing a held input is refused once this (run, round) masked one: the masks would then hide a
    second, different input (two inputs under the same masks reveal their difference)."""
    if held.site != ctx.site:
        raise ValueError(f"an input of site {held.site!r} held by {ctx.site!r}")
    with _locked(ctx):
        doc = _load(ctx, held.run_id, held.round, held.purpose)
        if doc is not None and doc.input_sha256 is not None:
            raise SecAggStateError(
                f"run {held.run_id} round {held.round}: this site already masked its {held.purpose} input; "
                "it does not hold another one"
            )
        path = _held_path(ctx, held.run_id, held.round)
        data = ctx.box.encrypt(held.model_dump_json().encode(), _held_ad(ctx, held.run_id, held.round))
        write_private(path, data, STATE_MODE)
        return path


def held_input(ctx: SiteExchange, *, run_id: str, round: int) -> HeldInput | None:
    """The input the site holds for (run, round) (``None``: none)."""
    path = _held_path(ctx, run_id, round)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise SecAggStateError(f"{path}: must be a regular file of mode 600 (is {st.st_mode & 0o777:o})")
        raw = f.read()
    try:
        held = HeldInput.model_validate_json(ctx.box.decrypt(raw, _held_ad(ctx, run_id, round)))
    except ValidationError as exc:
        raise SecAggStateError(f"{path}: not a held input ({exc.errors()[0]['msg']})") from None
    if (held.site, held.run_id, held.round) != (ctx.site, run_id, round):
        raise SecAggStateError(f"{path}: holds another round's input")
    return held


def release_input(ctx: SiteExchange, *, run_id: str, round: int) -> bool:
    """Erase the held input of (run, round) once the site revealed; ``True`` when there was one."""
    try:
        _held_path(ctx, run_id, round).unlink()
    except FileNotFoundError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# outcomes
# ----------------------------------------------------------------------------------------------------


class SiteStepStatus(StrEnum):
    ANSWERED = "answered"  # the phase's answer is in the bucket
    REFUSED = "refused"  # a signed refusal is in the bucket: the site left the aggregation
    REJECTED = "rejected"  # only jobs that do not open: nothing written
    WAITING = "waiting"  # no job of this phase for this site yet
    DONE = "done"  # this phase was answered before: nothing written again


@dataclass(frozen=True)
class SiteStep:
    """What one phase function did."""

    phase: Phase
    status: SiteStepStatus
    aggregation_id: uuid.UUID | None = None
    #: keys written into the exchange bucket by this call
    written: tuple[str, ...] = ()
    #: the refusal's reasons (code, field, message)
    reasons: tuple[dict[str, str], ...] = ()
    #: every job of this phase that did not open (reason_code, field, message, object_key)
    rejections: tuple[dict[str, str | None], ...] = ()


# ----------------------------------------------------------------------------------------------------
# the phases
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    header: JobHeader
    payload: SecAggPayload


def _find_jobs(
    ctx: SiteExchange,
    model: type[SecAggPayload],
    *,
    run_id: str,
    round_: int,
    seen: set[uuid.UUID],
    aggregation_id: uuid.UUID | None,
    now: datetime,
) -> tuple[list[_Found], list[dict[str, str | None]]]:
    """The jobs of ``model`` for this site in the round's folder that open, and the rejections of the rest
    (other kinds of job in the folder are skipped; an id already accepted is not new)."""
    found: list[_Found] = []
    rejections: list[dict[str, str | None]] = []
    for obj in ctx.storage.list(ctx.bucket, prefix_for(MessageKind.JOB, run_id, round_)):
        try:
            parse_object_key(obj.key)
        except ValueError:
            continue  # a blob beside the jobs
        try:
            raw = ctx.storage.get_bytes(ctx.bucket, obj.key)
            header, payload = open_payload(
                raw,
                model,
                expected=Expectation.for_job(
                    consortium=ctx.consortium,
                    site=ctx.site,
                    bucket=ctx.bucket,
                    object_key=obj.key,
                    run_id=run_id,
                    round=round_,
                ),
                public_key=ctx.coordinator_key,
                seen_ids=seen,
                aggregation_id=aggregation_id,
                now=now,
            )
        except StorageError as exc:
            log.warning("site %s could not read %s: %s", ctx.site, obj.key, exc)
            continue
        except MessageRejected as exc:
            if exc.reason_code in _OTHER_JOBS or (
                exc.reason_code is RejectReason.REPLAY and exc.field == "header.message_id"
            ):
                continue  # another phase's job, or one already accepted
            log.warning("site %s rejected s3://%s/%s: %s", ctx.site, ctx.bucket, obj.key, exc)
            rejections.append({**exc.to_dict(), "object_key": obj.key})
            continue
        assert isinstance(header, JobHeader) and isinstance(payload, SecAggPayload)
        found.append(_Found(header, payload))
    found.sort(key=lambda f: (f.header.created_at, str(f.header.message_id)))
    return found, rejections


def _reason(code: SecAggRefusalCode, field: str, message: str) -> dict[str, str]:
    return {"code": code.value, "field": field, "message": message}


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def _binding(doc: SiteAggregation) -> dict[str, Any]:
    return {
        "consortium": doc.setup.consortium,
        "run_id": doc.run_id,
        "round": doc.round,
        "site": doc.site,
        "aggregation_id": doc.aggregation_id,
    }


def _outgoing(
    kind: MessageKind, key: str, message_id: uuid.UUID, raw: bytes, *, keep: bool = True
) -> Outgoing:
    return Outgoing(
        key=key,
        kind=kind,
        message_id=message_id,
        sha256=sha256_hex(raw),
        size=len(raw),
        data=raw if keep else None,
    )


def _put(ctx: SiteExchange, doc: SiteAggregation, item: Outgoing, data: bytes) -> None:
    """Log, then put (the outbound log's write-ahead convention)."""
    ctx.outbound_log.append(
        OutboundRecord.for_object(
            kind=item.kind,
            bucket=ctx.bucket,
            object_key=item.key,
            data=data,
            run_id=doc.run_id,
            round=doc.round,
            message_id=item.message_id,
        )
    )
    content_type = "application/json" if item.key.endswith(".json") else "application/octet-stream"
    ctx.storage.put_bytes(ctx.bucket, item.key, data, content_type=content_type)


def _flush(ctx: SiteExchange, doc: SiteAggregation, masked: bytes | None = None) -> list[str]:
    """Put every prepared object; the masked vector's bytes come from the caller and must hash to what was
    recorded. Then the record says ``sent``, and the secrets go once the site revealed or left."""
    written = []
    for item in doc.outbox:
        data = item.data
        if data is None:
            if masked is None or sha256_hex(masked) != item.sha256:
                raise SecAggStateError(
                    f"aggregation {doc.aggregation_id}: the masked vector to send differs from the one "
                    "recorded (another input?), or none was given: nothing is sent — two masked inputs would "
                    "reveal their difference"
                )
            data = masked
        _put(ctx, doc, item, data)
        written.append(item.key)
    doc.sent = True
    if doc.status != "active" or doc.phase is Phase.REVEAL:
        doc.erase()
        doc.outbox = []
    _save(ctx, doc)
    return written


def _commit(
    ctx: SiteExchange, doc: SiteAggregation, phase: Phase, outbox: list[Outgoing], masked: bytes | None = None
) -> list[str]:
    """Record the phase's prepared replies (encrypted, before anything leaves), then send them."""
    doc.phase, doc.sent, doc.outbox = phase, False, outbox
    _save(ctx, doc)
    return _flush(ctx, doc, masked)


def _refusal(ctx: SiteExchange, job: JobHeader, reasons: list[dict[str, str]], now: datetime) -> Outgoing:
    header, raw = seal_refusal(job, reasons, signer=ctx.signer, ttl=ctx.answer_ttl, now=now)
    return _outgoing(MessageKind.REFUSAL, object_key(header), header.message_id, raw)


def _answer(ctx: SiteExchange, job: JobHeader, payload: SecAggPayload, now: datetime, **kw: Any) -> Outgoing:
    header, raw = seal_answer(job, payload, signer=ctx.signer, ttl=ctx.answer_ttl, now=now, **kw)
    return _outgoing(MessageKind.ANSWER, object_key(header), header.message_id, raw)


def _leave(
    ctx: SiteExchange,
    doc: SiteAggregation,
    phase: Phase,
    job: JobHeader,
    reasons: list[dict[str, str]],
    now: datetime,
) -> SiteStep:
    """Refuse ``job`` with ``reasons`` and leave the aggregation (its secrets are erased once sent)."""
    doc.status = "refused"
    written = _commit(ctx, doc, phase, [_refusal(ctx, job, reasons, now)])
    log.info("site %s left aggregation %s at %s: %s", ctx.site, doc.aggregation_id, phase.value, reasons)
    return SiteStep(phase, SiteStepStatus.REFUSED, doc.aggregation_id, tuple(written), tuple(reasons))


def _resume(
    ctx: SiteExchange,
    doc: SiteAggregation,
    phase: Phase,
    rejections: Sequence[dict[str, str | None]],
    masked: Callable[[SiteAggregation], bytes] | None = None,
) -> SiteStep | None:
    """The outcome when ``phase`` needs no new job: the site answered it (or a later one) before, or left
    the aggregation — a reply a crash left unsent is put again, byte for byte. ``None``: the phase is
    still ahead of the site."""
    here, there = _ORDER.index(phase), _ORDER.index(doc.phase)
    if doc.status == "active" and there < here:
        return None
    if there > here:
        return SiteStep(phase, SiteStepStatus.DONE, doc.aggregation_id, rejections=tuple(rejections))
    written: list[str] = []
    if not doc.sent:
        active_mask = masked is not None and doc.phase is Phase.MASKED and doc.status == "active"
        written = _flush(ctx, doc, masked(doc) if masked is not None and active_mask else None)
    if doc.status == "refused":
        status = SiteStepStatus.REFUSED
    else:
        status = SiteStepStatus.ANSWERED if written else SiteStepStatus.DONE
    return SiteStep(phase, status, doc.aggregation_id, tuple(written), rejections=tuple(rejections))


def _private(secrets: secagg.SiteSecrets) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw = Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    return secrets.c_sk.private_bytes(*raw), secrets.s_sk.private_bytes(*raw)


def _setup_reasons(ctx: SiteExchange, setup: SecAggSetup) -> list[dict[str, str]]:
    """The site's own checks of a setup: the protocol's rules and its minimum of planned sites."""
    reasons = []
    try:
        round_config(setup)
    except ValueError as exc:
        reasons.append(_reason(SecAggRefusalCode.INVALID_SETUP, "threshold", str(exc)))
    if len(setup.sites) < ctx.min_sites:
        reasons.append(
            _reason(
                SecAggRefusalCode.INVALID_SETUP,
                "sites",
                f"{len(setup.sites)} planned sites; this site takes part with at least {ctx.min_sites}",
            )
        )
    return reasons


def join(
    ctx: SiteExchange,
    *,
    run_id: str,
    round: int,
    purpose: Purpose,
    accept: Callable[[SecAggSetup], list[dict[str, str]]] | None = None,
    now: datetime | None = None,
) -> SiteStep:
    """Phase ``keys``: open the coordinator's :class:`SecAggSetup` for ``purpose``, check it (the protocol's
    rules, at least ``ctx.min_sites`` planned sites, and ``accept``: the caller's policy checks returning
    refusal reasons), draw the round's keys, keep them encrypted at the site, answer with the public halves.

    A new setup after the site masked an input of this (run, round, purpose) is refused
    (``secagg_input_already_masked``); one that replaces an aggregation abandoned before masking starts
    afresh with new keys.
    """
    now = _now(now)
    with _locked(ctx):
        doc = _load(ctx, run_id, round, purpose)
        seen: set[uuid.UUID] = set(doc.seen) if doc else set()
        found, rejections = _find_jobs(
            ctx, SecAggSetup, run_id=run_id, round_=round, seen=seen, aggregation_id=None, now=now
        )
        setups = [f for f in found if isinstance(f.payload, SecAggSetup) and f.payload.purpose == purpose]
        if not setups:
            if doc is None:
                status = SiteStepStatus.REJECTED if rejections else SiteStepStatus.WAITING
                return SiteStep(Phase.KEYS, status, rejections=tuple(rejections))
            resumed = _resume(ctx, doc, Phase.KEYS, rejections)
            assert resumed is not None
            return resumed
        job, setup = setups[0].header, setups[0].payload
        assert isinstance(setup, SecAggSetup)
        if doc is not None and (doc.input_sha256 is not None or doc.status == "done"):
            return _refuse_again(ctx, doc, job, now)
        fresh = SiteAggregation(
            site=ctx.site,
            run_id=run_id,
            round=round,
            purpose=purpose,
            aggregation_id=setup.aggregation_id,
            setup=setup,
            phase=Phase.KEYS,
            seen=seen | {job.message_id},
        )
        reasons = _setup_reasons(ctx, setup) + (accept(setup) if accept else [])
        if reasons:
            return _leave(ctx, fresh, Phase.KEYS, job, reasons, now)
        secrets = secagg.generate_site_keys(ctx.site)
        fresh.c_sk, fresh.s_sk = _private(secrets)
        fresh.b = secrets.b
        public = secrets.public()
        keys = SecAggKeys(**_binding(fresh), c_pk=public.c_pk, s_pk=public.s_pk)
        written = _commit(ctx, fresh, Phase.KEYS, [_answer(ctx, job, keys, now)])
        return SiteStep(
            Phase.KEYS,
            SiteStepStatus.ANSWERED,
            setup.aggregation_id,
            tuple(written),
            rejections=tuple(rejections),
        )


def _refuse_again(ctx: SiteExchange, doc: SiteAggregation, job: JobHeader, now: datetime) -> SiteStep:
    """Refuse a second aggregation of an input already masked; the record of the first one stays as is."""
    reasons = [
        _reason(
            SecAggRefusalCode.INPUT_ALREADY_MASKED,
            "aggregation_id",
            f"this site already masked its {doc.purpose} of run {doc.run_id!r} round {doc.round} in "
            f"aggregation {doc.aggregation_id}; it masks one input per round, once",
        )
    ]
    item = _refusal(ctx, job, reasons, now)
    doc.seen.add(job.message_id)
    _save(ctx, doc)
    _put(ctx, doc, item, item.data or b"")
    return SiteStep(Phase.KEYS, SiteStepStatus.REFUSED, doc.aggregation_id, (item.key,), tuple(reasons))


def _next_phase(
    ctx: SiteExchange,
    phase: Phase,
    *,
    run_id: str,
    round_: int,
    purpose: Purpose,
    now: datetime,
    step: Callable[[SiteAggregation, JobHeader, Any, list[dict[str, str | None]]], SiteStep],
    masked: Callable[[SiteAggregation], bytes] | None = None,
) -> SiteStep:
    """Common driver of the phases after ``keys``: find this aggregation's job of ``phase``, or resume."""
    with _locked(ctx):
        doc = _load(ctx, run_id, round_, purpose)
        if doc is None:
            return SiteStep(phase, SiteStepStatus.WAITING)
        found, rejections = _find_jobs(
            ctx,
            _JOB[phase],
            run_id=run_id,
            round_=round_,
            seen=doc.seen,
            aggregation_id=doc.aggregation_id,
            now=now,
        )
        resumed = _resume(ctx, doc, phase, rejections, masked)
        if resumed is not None:
            return resumed
        if _ORDER.index(doc.phase) + 1 != _ORDER.index(phase) or not doc.sent:
            # an earlier phase is not answered yet: this phase's job waits for it
            return SiteStep(phase, SiteStepStatus.WAITING, doc.aggregation_id, rejections=tuple(rejections))
        if not found:
            status = SiteStepStatus.REJECTED if rejections else SiteStepStatus.WAITING
            return SiteStep(phase, status, doc.aggregation_id, rejections=tuple(rejections))
        job = found[0].header
        doc.seen.add(job.message_id)
        return step(doc, job, found[0].payload, rejections)


def share(
    ctx: SiteExchange, *, run_id: str, round: int, purpose: Purpose, now: datetime | None = None
) -> SiteStep:
    """Phase ``shares``: open the roster (U1), check it carries the keys this site advertised and only
    planned sites, and answer with one encrypted Shamir share of ``b`` and ``s_sk`` per shareholder."""
    now = _now(now)

    def step(doc: SiteAggregation, job: JobHeader, roster: SecAggRoster, rejections: list[Any]) -> SiteStep:
        config = round_config(doc.setup)
        secrets = doc.secrets()
        public = secrets.public()
        keys = {k.site: k for k in roster.keys}
        if stray := sorted(set(keys) - set(config.sites)):
            reason = f"the roster names sites outside the aggregation: {', '.join(stray)}"
            return _leave(
                ctx,
                doc,
                Phase.SHARES,
                job,
                [_reason(SecAggRefusalCode.ROSTER_INCONSISTENT, "keys", reason)],
                now,
            )
        if keys.get(ctx.site) != AdvertisedKey(site=ctx.site, c_pk=public.c_pk, s_pk=public.s_pk):
            reason = f"the roster does not carry the keys {ctx.site!r} advertised"
            return _leave(
                ctx,
                doc,
                Phase.SHARES,
                job,
                [_reason(SecAggRefusalCode.ROSTER_INCONSISTENT, "keys", reason)],
                now,
            )
        doc.roster = list(roster.keys)
        try:
            encrypted = secagg.share_keys(config, secrets, doc.advertised())
        except ValueError as exc:
            return _leave(
                ctx,
                doc,
                Phase.SHARES,
                job,
                [_reason(SecAggRefusalCode.ROSTER_INCONSISTENT, "keys", str(exc))],
                now,
            )
        payload = SecAggShares(
            **_binding(doc),
            shares=[
                EncryptedShareModel(
                    sender=c.sender, recipient=c.recipient, nonce=c.nonce, ciphertext=c.ciphertext
                )
                for c in encrypted
            ],
        )
        written = _commit(ctx, doc, Phase.SHARES, [_answer(ctx, job, payload, now)])
        return SiteStep(
            Phase.SHARES,
            SiteStepStatus.ANSWERED,
            doc.aggregation_id,
            tuple(written),
            rejections=tuple(rejections),
        )

    return _next_phase(ctx, Phase.SHARES, run_id=run_id, round_=round, purpose=purpose, now=now, step=step)


def _ring_bytes(vector: np.ndarray) -> bytes:
    return vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()


def _mask(
    ctx: SiteExchange,
    *,
    run_id: str,
    round_: int,
    purpose: Purpose,
    encode: Callable[[SiteAggregation], np.ndarray],
    now: datetime,
) -> SiteStep:
    """Phase ``masked`` for an input the caller encodes into the aggregation's ring (``encode``)."""

    def masked_again(doc: SiteAggregation) -> bytes:
        """The masked vector recorded before a crash, recomputed from the same input (checked)."""
        x = encode(doc)
        if sha256_hex(_ring_bytes(x)) != doc.input_sha256:
            raise SecAggStateError(
                f"aggregation {doc.aggregation_id}: this input differs from the one the site masked; nothing "
                "is sent — two masked inputs would reveal their difference"
            )
        config = round_config(doc.setup)
        return _ring_bytes(
            secagg.mask_input(config, doc.secrets(), doc.advertised(), doc.received_shares(), x)
        )

    def step(doc: SiteAggregation, job: JobHeader, inbox: SecAggInbox, rejections: list[Any]) -> SiteStep:
        config = round_config(doc.setup)
        me = ctx.site

        def leave(code: SecAggRefusalCode, field: str, message: str) -> SiteStep:
            return _leave(ctx, doc, Phase.MASKED, job, [_reason(code, field, message)], now)

        roster = {k.site for k in doc.roster}
        if stray := sorted(set(inbox.shared) - roster):
            return leave(
                SecAggRefusalCode.SHARE_REJECTED, "shared", f"shared names sites outside the roster: {stray}"
            )
        if me not in inbox.shared:
            return leave(
                SecAggRefusalCode.SHARE_REJECTED, "shared", f"{me!r} is not among the sites that shared"
            )
        want = config.shareholders(me) & set(inbox.shared)
        have = {s.sender for s in inbox.shares}
        if have != want:
            return leave(
                SecAggRefusalCode.SHARE_REJECTED,
                "shares",
                f"shares from {sorted(have)}; the shareholders of {me!r} that shared are {sorted(want)}",
            )
        ciphertexts = [
            secagg.EncryptedShare(config.round_id, s.sender, s.recipient, s.nonce, s.ciphertext)
            for s in inbox.shares
        ]
        try:
            received = secagg.receive_shares(config, doc.secrets(), doc.advertised(), ciphertexts)
        except ValueError as exc:
            return leave(SecAggRefusalCode.SHARE_REJECTED, "shares", str(exc))
        try:
            x = encode(doc)
        except ValueError as exc:
            return leave(SecAggRefusalCode.INPUT_REJECTED, "input", str(exc))
        y = _ring_bytes(secagg.mask_input(config, doc.secrets(), doc.advertised(), received, x))
        doc.shared = list(inbox.shared)
        doc.received = {
            u: ReceivedModel(
                b=ShareModel(index=r.b.index, value=r.b.value),
                s_sk=ShareModel(index=r.s_sk.index, value=r.s_sk.value),
            )
            for u, r in received.items()
        }
        doc.input_sha256 = sha256_hex(_ring_bytes(x))
        answer_id = uuid.uuid4()
        ref = BlobRef(key=masked_key(doc.run_id, doc.round, answer_id), sha256=sha256_hex(y), size=len(y))
        payload = SecAggMasked(**_binding(doc), masked=ref, bits=doc.setup.bits, length=x.size)
        outbox = [
            _outgoing(MessageKind.ANSWER, ref.key, answer_id, y, keep=False),
            _answer(ctx, job, payload, now, message_id=answer_id),
        ]
        written = _commit(ctx, doc, Phase.MASKED, outbox, y)
        return SiteStep(
            Phase.MASKED,
            SiteStepStatus.ANSWERED,
            doc.aggregation_id,
            tuple(written),
            rejections=tuple(rejections),
        )

    return _next_phase(
        ctx,
        Phase.MASKED,
        run_id=run_id,
        round_=round_,
        purpose=purpose,
        now=now,
        step=step,
        masked=masked_again,
    )


def mask_update(
    ctx: SiteExchange,
    *,
    run_id: str,
    round: int,
    arrays: Sequence[np.ndarray],
    n_samples: int,
    now: datetime | None = None,
) -> SiteStep:
    """Phase ``masked`` of an update aggregation: open the inbox (U2 and the shares addressed to this site),
    decrypt and check every share, encode ``[n q(w), n]`` (:class:`~lepton_tasks.federation.secagg_round.
    UpdateCodec`; an update beyond the clip bound is refused, never clipped), mask it with the pairwise and
    self masks, and write the masked vector (a blob by SHA-256) and the answer naming it."""

    def encode(doc: SiteAggregation) -> np.ndarray:
        if doc.setup.update is None:
            raise ValueError("the aggregation sums no update")
        return UpdateCodec(doc.setup.update, len(doc.setup.sites), doc.setup.bits).encode(arrays, n_samples)

    return _mask(ctx, run_id=run_id, round_=round, purpose="update", encode=encode, now=_now(now))


def mask_statistics(
    ctx: SiteExchange,
    *,
    run_id: str,
    round: int,
    statistics: SufficientStats,
    contract: Contract,
    now: datetime | None = None,
) -> SiteStep:
    """Phase ``masked`` of a statistics aggregation: as :func:`mask_update`, for the site's additive training
    statistics (:class:`~lepton_tasks.federation.secagg_round.StatisticsCodec` over ``contract``, whose
    version and hash must be the layout's)."""

    def encode(doc: SiteAggregation) -> np.ndarray:
        if doc.setup.statistics is None:
            raise ValueError("the aggregation sums no statistics")
        return StatisticsCodec(contract, doc.setup.statistics, len(doc.setup.sites)).encode(statistics)

    return _mask(ctx, run_id=run_id, round_=round, purpose="statistics", encode=encode, now=_now(now))


def reveal(
    ctx: SiteExchange, *, run_id: str, round: int, purpose: Purpose, now: datetime | None = None
) -> SiteStep:
    """Phase ``reveal``: open the survivors (U3), check them against the sites that shared, and reveal, per
    neighbour, its share of ``b`` (a survivor) or of ``s_sk`` (a dropout) — once: a second survivors job is
    never answered. The round's secrets are erased once the reveal is in the bucket."""
    now = _now(now)

    def step(
        doc: SiteAggregation, job: JobHeader, survivors: SecAggSurvivors, rejections: list[Any]
    ) -> SiteStep:
        config = round_config(doc.setup)
        alive = set(survivors.survivors)
        if stray := sorted(alive - set(doc.shared)):
            reason = f"survivors that did not share their keys: {', '.join(stray)}"
            return _leave(
                ctx,
                doc,
                Phase.REVEAL,
                job,
                [_reason(SecAggRefusalCode.SURVIVORS_INCONSISTENT, "survivors", reason)],
                now,
            )
        try:
            revealed = secagg.reveal_shares(config, ctx.site, doc.received_shares(), alive)
        except ValueError as exc:
            return _leave(
                ctx,
                doc,
                Phase.REVEAL,
                job,
                [_reason(SecAggRefusalCode.SURVIVORS_INCONSISTENT, "survivors", str(exc))],
                now,
            )
        payload = SecAggReveal(
            **_binding(doc),
            b_shares={u: ShareModel(index=s.index, value=s.value) for u, s in revealed.b_shares.items()},
            s_sk_shares={
                u: ShareModel(index=s.index, value=s.value) for u, s in revealed.s_sk_shares.items()
            },
        )
        written = _commit(ctx, doc, Phase.REVEAL, [_answer(ctx, job, payload, now)])
        return SiteStep(
            Phase.REVEAL,
            SiteStepStatus.ANSWERED,
            doc.aggregation_id,
            tuple(written),
            rejections=tuple(rejections),
        )

    return _next_phase(ctx, Phase.REVEAL, run_id=run_id, round_=round, purpose=purpose, now=now, step=step)
