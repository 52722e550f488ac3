"""The messages of secure aggregation (``federation.secagg``) as they travel through the exchange buckets.

Each phase of the Bonawitz et al. 2017 protocol is one coordinator → site *job* and one site → coordinator
*answer*, sealed in the exchange envelope (:mod:`lepton_tasks.core.exchange`: Ed25519 signatures of Vault
transit keys pinned at enrollment; object keys ``jobs|answers/<run>/<round>/<message id>.json``)::

    phase   coordinator → site (job)              site → coordinator (answer)
    keys    SecAggSetup   the public round config  SecAggKeys     its two X25519 public keys
    shares  SecAggRoster  U1: the advertised keys  SecAggShares   its encrypted Shamir shares
    masked  SecAggInbox   U2: shares addressed to  SecAggMasked   its masked ring vector (a blob by SHA-256)
                          the site + the U2 list
    reveal  SecAggSurvivors U3: the survivors      SecAggReveal   one share per neighbour (b or s_sk)

A site that will not go on (an inconsistent roster, a share addressed to another site, an input it already
masked) answers a phase's job with the exchange's signed :class:`~lepton_tasks.core.messages.RoundRefusal`.

Every payload carries its schema version, consortium, run, round, site (the job's addressee, the answer's
sender) and the ``aggregation_id`` the coordinator drew for the aggregation, and :func:`open_payload` checks
them against the signed header AND the reader's own expectation: a payload moved to another site is
``moved``, one of another run, round or aggregation is ``replay``. The coordinator never sees a key that
decrypts the shares it relays, and a share's AES-GCM associated data binds (round id, sender, recipient).

The masked input (a ring vector of ``length`` little-endian ``uint32``/``uint64`` words) is a blob beside the
answer, ``answers/<run>/<round>/<answer id>.masked``, referenced by key, size and SHA-256 in the signed answer
(as the update blobs of plain rounds are), so a swapped or edited vector is rejected.

This module sits in ``core`` (types and framing only, no protocol math): it imports nothing outside ``core``.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from collections.abc import Container, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import (
    UUID4,
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from lepton_tasks.core.exchange import (
    ID_PATTERN,
    RUN_ID_PATTERN,
    SHA256_PATTERN,
    AnswerHeader,
    Expectation,
    JobHeader,
    JobRef,
    MessageKind,
    MessageRejected,
    RefusalHeader,
    RejectReason,
    canonical_json,
    make_header,
    open_message,
    prefix_for,
    reply_header,
    seal,
)
from lepton_tasks.core.messages import BlobRef, Message, RoundRefusal, dump
from lepton_tasks.core.signatures import PublicKey, Signer

__all__ = [
    "MASKED_SUFFIX",
    "SECAGG_MODELS",
    "AdvertisedKey",
    "EncryptedShareModel",
    "Purpose",
    "SecAggInbox",
    "SecAggKeys",
    "SecAggMasked",
    "SecAggPayload",
    "SecAggReveal",
    "SecAggRoster",
    "SecAggSetup",
    "SecAggShares",
    "SecAggSurvivors",
    "ShareModel",
    "StatisticsLayout",
    "UpdateLayout",
    "aggregation_round_id",
    "json_schemas",
    "masked_key",
    "open_payload",
    "seal_answer",
    "seal_job",
    "seal_refusal",
]

#: what is summed: a sample-weighted model update (FedAvg) or the additive training statistics
Purpose = Literal["update", "statistics"]
#: suffix of the masked-vector blob a site writes beside its :class:`SecAggMasked` answer
MASKED_SUFFIX: Final = ".masked"

_KEY_BYTES: Final = 32  # X25519 public keys
_NONCE_BYTES: Final = 12  # AES-GCM nonces
_MAX_CIPHERTEXT: Final = 1024  # one encrypted share is 66 bytes + 16 of tag; anything far larger is junk
_SHARE_CHUNK: Final = 16  # Shamir over GF(2^128): a share is a non-empty multiple of 16 bytes


# ----------------------------------------------------------------------------------------------------
# bytes in JSON: canonical standard base64, nothing else
# ----------------------------------------------------------------------------------------------------


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):  # a writer building the model in Python
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a standard base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise ValueError("is not canonical standard base64")
    return raw


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _length(n: int) -> AfterValidator:
    def check(value: bytes) -> bytes:
        if len(value) != n:
            raise ValueError(f"must be {n} bytes, got {len(value)}")
        return value

    return AfterValidator(check)


#: bytes, serialized as canonical standard base64 in JSON (the JSON Schema says so)
B64Bytes = Annotated[
    bytes,
    PlainValidator(_b64decode),
    PlainSerializer(_b64encode, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
Key32 = Annotated[B64Bytes, _length(_KEY_BYTES)]
Nonce12 = Annotated[B64Bytes, _length(_NONCE_BYTES)]
SiteId = Annotated[str, Field(pattern=ID_PATTERN)]


def _unique(values: Sequence[str], what: str) -> None:
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{what} lists {', '.join(dup)} more than once")


def _frozen() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------


class UpdateLayout(BaseModel):
    """How a model update becomes a ring vector (``FixedPoint.encode_weighted``): the arrays' shapes
    (flattened and concatenated in order), the clip bound (a site refuses values beyond it rather than
    change its model silently) and the largest sample count a site may weight its update with."""

    model_config = _frozen()

    shapes: list[list[Annotated[int, Field(ge=0)]]] = Field(min_length=1)
    clip: float = Field(gt=0, allow_inf_nan=False)
    max_samples: int = Field(ge=1)

    @property
    def size(self) -> int:
        """Parameters in the update (the ring vector has one more word: the sample count)."""
        return sum(math.prod(s) for s in self.shapes)

    @model_validator(mode="after")
    def _not_empty(self) -> UpdateLayout:
        if self.size == 0:
            raise ValueError("shapes hold no parameter")
        return self


class StatisticsLayout(BaseModel):
    """How a site's additive training statistics become a ring vector (``federation.secagg_round``): the
    contract they follow, the most rows a site may have (counts are exact ring integers up to it) and,
    per numeric feature, the largest absolute value a row may hold (public: the contract's declared range,
    or a bound the coordinator chose), which scales the fixed-point encoding of its sum and sum of
    squares."""

    model_config = _frozen()

    dataset: str = Field(min_length=1)
    contract_version: int = Field(ge=1)
    contract_sha256: str = Field(pattern=SHA256_PATTERN)
    max_rows: int = Field(ge=1)
    bounds: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]]


class AdvertisedKey(BaseModel):
    """One site's advertised X25519 public keys: ``c_pk`` (share channel) and ``s_pk`` (pairwise masks)."""

    model_config = _frozen()

    site: SiteId
    c_pk: Key32
    s_pk: Key32


class EncryptedShareModel(BaseModel):
    """One AES-256-GCM ciphertext of the sender's two Shamir shares, for one recipient."""

    model_config = _frozen()

    sender: SiteId
    recipient: SiteId
    nonce: Nonce12
    ciphertext: Annotated[B64Bytes, AfterValidator(lambda v: _bounded(v, _MAX_CIPHERTEXT))]


def _bounded(value: bytes, limit: int) -> bytes:
    if not 0 < len(value) <= limit:
        raise ValueError(f"must be 1 to {limit} bytes, got {len(value)}")
    return value


def _share_value(value: bytes) -> bytes:
    if not value or len(value) % _SHARE_CHUNK or len(value) > 4 * _SHARE_CHUNK:
        raise ValueError(f"a share value is 16, 32, 48 or 64 bytes, got {len(value)}")
    return value


class ShareModel(BaseModel):
    """One revealed Shamir share: the holder's index and its value."""

    model_config = _frozen()

    index: int = Field(ge=1, le=65535)
    value: Annotated[B64Bytes, AfterValidator(_share_value)]


# ----------------------------------------------------------------------------------------------------
# payloads
# ----------------------------------------------------------------------------------------------------


class SecAggPayload(Message):
    """What every secure-aggregation payload carries; :func:`open_payload` checks it against the header."""

    #: the typed model's name and version, as the envelope's ``payload_schema``
    payload_schema: ClassVar[str]
    #: the envelope kind that carries it
    envelope_kind: ClassVar[MessageKind]

    consortium: str = Field(pattern=ID_PATTERN)
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    round: int = Field(ge=0, le=999_999)
    site: str = Field(
        pattern=ID_PATTERN, description="the job's addressee (coordinator → site) or the answer's sender"
    )
    aggregation_id: UUID4 = Field(description="drawn by the coordinator for one aggregation")


class SecAggSetup(SecAggPayload):
    """``lepton-secagg-setup/1`` (job): the public parameters of one aggregation, known to every party.

    ``sites``: the planned participants (their sorted order defines the masks' signs); ``threshold``:
    shares needed to reconstruct a secret (``federation.secagg.RoundConfig`` checks it); ``degree``:
    SecAgg+ neighbours (``None``: everyone); ``bits``: the ring width. ``for_job``: the round's job whose
    result this aggregation sums (``None``: stand-alone).
    """

    payload_schema: ClassVar[str] = "lepton-secagg-setup/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.JOB

    purpose: Purpose
    for_job: JobRef | None = None
    sites: list[SiteId] = Field(min_length=3)
    threshold: int = Field(ge=2)
    degree: int | None = Field(None, ge=1)
    bits: Literal[32, 64] = 32
    update: UpdateLayout | None = None
    statistics: StatisticsLayout | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SecAggSetup:
        _unique(self.sites, "sites")
        if self.site not in self.sites:
            raise ValueError(f"the addressee {self.site!r} is not among the sites")
        if self.purpose == "update" and (self.update is None or self.statistics is not None):
            raise ValueError("an update aggregation carries an update layout and no statistics layout")
        if self.purpose == "statistics":
            if self.statistics is None or self.update is not None:
                raise ValueError("a statistics aggregation carries a statistics layout and no update layout")
            if self.bits != 64:
                raise ValueError("statistics are summed in the 64-bit ring (bits = 64)")
        return self

    @property
    def round_id(self) -> str:
        """The protocol's round id (key derivation, associated data, SecAgg+ graph seed)."""
        return aggregation_round_id(
            self.consortium, self.run_id, self.round, self.purpose, self.aggregation_id
        )


class SecAggKeys(SecAggPayload):
    """``lepton-secagg-keys/1`` (answer to the setup): the site's two fresh X25519 public keys."""

    payload_schema: ClassVar[str] = "lepton-secagg-keys/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.ANSWER

    c_pk: Key32
    s_pk: Key32


class SecAggRoster(SecAggPayload):
    """``lepton-secagg-roster/1`` (job): ``U1``, every site whose keys the coordinator accepted."""

    payload_schema: ClassVar[str] = "lepton-secagg-roster/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.JOB

    keys: list[AdvertisedKey] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_sites(self) -> SecAggRoster:
        _unique([k.site for k in self.keys], "keys")
        return self


class SecAggShares(SecAggPayload):
    """``lepton-secagg-shares/1`` (answer to the roster): one encrypted share per shareholder."""

    payload_schema: ClassVar[str] = "lepton-secagg-shares/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.ANSWER

    shares: list[EncryptedShareModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _from_the_sender(self) -> SecAggShares:
        if bad := sorted({s.sender for s in self.shares if s.sender != self.site}):
            raise ValueError(f"shares sent by {self.site!r} name other senders: {', '.join(bad)}")
        _unique([s.recipient for s in self.shares], "shares (recipients)")
        return self


class SecAggInbox(SecAggPayload):
    """``lepton-secagg-inbox/1`` (job): ``U2`` (whose shares were relayed) and the shares addressed to the
    site, relayed unread (the coordinator holds no key that decrypts them)."""

    payload_schema: ClassVar[str] = "lepton-secagg-inbox/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.JOB

    shared: list[SiteId] = Field(min_length=1)
    shares: list[EncryptedShareModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _senders_shared(self) -> SecAggInbox:
        _unique(self.shared, "shared")
        _unique([s.sender for s in self.shares], "shares (senders)")
        if stray := sorted({s.sender for s in self.shares} - set(self.shared)):
            raise ValueError(f"shares from sites outside shared: {', '.join(stray)}")
        return self


class SecAggMasked(SecAggPayload):
    """``lepton-secagg-masked/1`` (answer to the inbox): the masked ring vector, a blob by SHA-256."""

    payload_schema: ClassVar[str] = "lepton-secagg-masked/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.ANSWER

    masked: BlobRef
    bits: Literal[32, 64]
    length: int = Field(ge=1, description="ring words in the blob (little-endian)")

    @model_validator(mode="after")
    def _size(self) -> SecAggMasked:
        if self.masked.size != self.length * self.bits // 8:
            raise ValueError(
                f"masked.size {self.masked.size} is not length {self.length} x {self.bits // 8} bytes"
            )
        return self


class SecAggSurvivors(SecAggPayload):
    """``lepton-secagg-survivors/1`` (job): ``U3``, the sites whose masked input the coordinator accepted."""

    payload_schema: ClassVar[str] = "lepton-secagg-survivors/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.JOB

    survivors: list[SiteId] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_survivors(self) -> SecAggSurvivors:
        _unique(self.survivors, "survivors")
        return self


class SecAggReveal(SecAggPayload):
    """``lepton-secagg-reveal/1`` (answer to the survivors): per neighbour, the share of its self-mask seed
    ``b`` (a survivor) or of its mask key ``s_sk`` (a dropout), never both."""

    payload_schema: ClassVar[str] = "lepton-secagg-reveal/1"
    envelope_kind: ClassVar[MessageKind] = MessageKind.ANSWER

    b_shares: dict[SiteId, ShareModel] = Field(default_factory=dict)
    s_sk_shares: dict[SiteId, ShareModel] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _never_both(self) -> SecAggReveal:
        if both := sorted(set(self.b_shares) & set(self.s_sk_shares)):
            raise ValueError(f"both secrets of {', '.join(both)} revealed")
        return self


#: every secure-aggregation payload, by the name its JSON Schema is exported under
SECAGG_MODELS: Final[dict[str, type[SecAggPayload]]] = {
    "secagg-setup": SecAggSetup,
    "secagg-keys": SecAggKeys,
    "secagg-roster": SecAggRoster,
    "secagg-shares": SecAggShares,
    "secagg-inbox": SecAggInbox,
    "secagg-masked": SecAggMasked,
    "secagg-survivors": SecAggSurvivors,
    "secagg-reveal": SecAggReveal,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every secure-aggregation payload (exported with the other boundary models)."""
    return {name: model.model_json_schema(by_alias=True) for name, model in SECAGG_MODELS.items()}


def aggregation_round_id(
    consortium: str, run_id: str, round: int, purpose: str, aggregation_id: uuid.UUID
) -> str:
    """The protocol round id of an aggregation: every party derives it from the same public fields, so a
    share or mask of one aggregation is useless in another."""
    return f"lepton-secagg/{consortium}/{run_id}/{round}/{purpose}/{aggregation_id}"


def masked_key(run_id: str, round: int, answer_id: uuid.UUID) -> str:
    """Where a site puts its masked vector: beside its answer, under ``answers/`` (its outbound log's)."""
    return f"{prefix_for(MessageKind.ANSWER, run_id, round)}{answer_id}{MASKED_SUFFIX}"


# ----------------------------------------------------------------------------------------------------
# sealing and opening
# ----------------------------------------------------------------------------------------------------


def _body(payload: Message) -> bytes:
    return canonical_json(dump(payload))


def seal_job(
    payload: SecAggPayload, *, bucket: str, signer: Signer, ttl: timedelta, now: datetime | None = None
) -> tuple[JobHeader, bytes]:
    """The coordinator's sealed job for ``payload`` (addressed to ``payload.site`` in ``bucket``); the job
    expires ``ttl`` after ``now``: the phase's deadline."""
    if payload.envelope_kind is not MessageKind.JOB:
        raise ValueError(f"{type(payload).__name__} is an answer, not a job")
    body = _body(payload)
    header = make_header(
        MessageKind.JOB,
        consortium=payload.consortium,
        run_id=payload.run_id,
        round=payload.round,
        site=payload.site,
        bucket=bucket,
        payload=body,
        payload_schema=payload.payload_schema,
        ttl=ttl,
        now=now,
    )
    assert isinstance(header, JobHeader)
    return header, seal(header, body, signer)


def seal_answer(
    job: JobHeader,
    payload: SecAggPayload,
    *,
    signer: Signer,
    ttl: timedelta,
    now: datetime | None = None,
    message_id: uuid.UUID | None = None,
) -> tuple[AnswerHeader, bytes]:
    """A site's sealed answer to ``job``; the payload must be bound to the same consortium, run, round and
    site as the job (a mismatch is the caller's bug: :class:`ValueError`)."""
    if payload.envelope_kind is not MessageKind.ANSWER:
        raise ValueError(f"{type(payload).__name__} is a job, not an answer")
    mine = (payload.consortium, payload.run_id, payload.round, payload.site)
    if mine != (job.consortium, job.run_id, job.round, job.site):
        raise ValueError(f"the answer is bound to {mine}, the job to its own consortium, run, round, site")
    body = _body(payload)
    header = reply_header(
        job,
        MessageKind.ANSWER,
        payload=body,
        payload_schema=payload.payload_schema,
        ttl=ttl,
        now=now,
        message_id=message_id,
    )
    assert isinstance(header, AnswerHeader)
    return header, seal(header, body, signer)


def seal_refusal(
    job: JobHeader,
    reasons: Sequence[Mapping[str, str]],
    *,
    signer: Signer,
    ttl: timedelta,
    now: datetime | None = None,
) -> tuple[RefusalHeader, bytes]:
    """A site's sealed :class:`RoundRefusal` of ``job``, with every reason (code, field, message)."""
    body = _body(RoundRefusal(reasons=[dict(r) for r in reasons]))
    header = reply_header(
        job, MessageKind.REFUSAL, payload=body, payload_schema=RoundRefusal.payload_schema, ttl=ttl, now=now
    )
    assert isinstance(header, RefusalHeader)
    return header, seal(header, body, signer)


P = TypeVar("P", bound=SecAggPayload)


def _reject(reason: RejectReason, message: str, field: str) -> MessageRejected:
    return MessageRejected(reason, message, field=field)


def _parse(model: type[Message], payload: bytes) -> Any:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(["payload", *(str(p) for p in err["loc"])])
        raise _reject(
            RejectReason.MALFORMED, f"field {field}: {err['msg']} (a {model.__name__})", field
        ) from None


def open_payload(
    raw: bytes,
    model: type[P],
    *,
    expected: Expectation,
    public_key: str | PublicKey,
    seen_ids: Container[uuid.UUID],
    aggregation_id: uuid.UUID | None = None,
    allow_refusal: bool = False,
    now: datetime | None = None,
) -> tuple[JobHeader | AnswerHeader | RefusalHeader, P | RoundRefusal]:
    """Open a secure-aggregation message: :func:`~lepton_tasks.core.exchange.open_message` (signature,
    hash, addressing, kind, run, round, id, time, binding to the job), then the payload as ``model`` (or,
    with ``allow_refusal``, the site's :class:`RoundRefusal`), then the payload's own consortium, run,
    round, site and aggregation against the signed header and ``aggregation_id`` (the reader's own).

    Raises :class:`~lepton_tasks.core.exchange.MessageRejected` with the reason and the field.
    """
    schemas = {model.payload_schema} | ({RoundRefusal.payload_schema} if allow_refusal else set())
    if expected.payload_schemas is not None and not schemas <= expected.payload_schemas:
        raise ValueError("the expectation's payload_schemas must admit what is opened here")
    expected = expected.model_copy(update={"payload_schemas": frozenset(schemas)})
    header, body = open_message(raw, expected=expected, public_key=public_key, seen_ids=seen_ids, now=now)
    if header.payload_schema == RoundRefusal.payload_schema:
        if header.kind is not MessageKind.REFUSAL:
            raise _reject(RejectReason.WRONG_KIND, "a refusal payload in a non-refusal", "header.kind")
        refusal: RoundRefusal = _parse(RoundRefusal, body)
        return header, refusal
    if header.kind is not model.envelope_kind:
        raise _reject(
            RejectReason.WRONG_KIND,
            f"header.kind is {header.kind.value!r}; a {model.__name__} travels as a "
            f"{model.envelope_kind.value}",
            "header.kind",
        )
    payload: P = _parse(model, body)
    for name, reason in (
        ("consortium", RejectReason.MOVED),
        ("site", RejectReason.MOVED),
        ("run_id", RejectReason.REPLAY),
        ("round", RejectReason.REPLAY),
    ):
        have, want = getattr(payload, name), getattr(header, name)
        if have != want:
            raise _reject(
                reason, f"payload.{name} is {have!r}, the signed header says {want!r}", f"payload.{name}"
            )
    if aggregation_id is not None and payload.aggregation_id != aggregation_id:
        raise _reject(
            RejectReason.REPLAY,
            f"payload.aggregation_id is {payload.aggregation_id}, "
            f"this reader is in aggregation {aggregation_id}",
            "payload.aggregation_id",
        )
    return header, payload
