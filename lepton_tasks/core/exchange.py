"""The envelope of every coordinator ↔ site message: signed, typed, versioned and bound to its place.

Each site has its own *exchange bucket* in the coordinator's object storage. The coordinator writes jobs into
it; the site writes its answers (or refusals) back into the same bucket. Every object there is one
:class:`SignedMessage`, written by :func:`seal` and read by :func:`open_message`::

    {"header": {...}, "payload": "<base64>", "schema_version": 1, "signature": "vault:v1:<base64>"}

- The **header** (:data:`Header`: :class:`JobHeader` | :class:`AnswerHeader` | :class:`RefusalHeader`,
  told apart by ``kind``) binds the message to its consortium, run, round, site, exchange bucket and object
  key, gives it a unique id, a creation time and an expiry, and carries the SHA-256 and size of the payload.
  An answer or refusal also names the job it answers (its message id *and* payload hash: :class:`JobRef`).
- The **signed bytes** are the canonical JSON of the header (:func:`canonical_json`: sorted keys, no
  whitespace, ASCII). The payload is covered through its hash, so the signature is over a few hundred bytes
  whatever the payload's size, and a reader can check it before trusting anything else in the object.
- The **payload** is opaque bytes here; ``payload_schema`` (e.g. ``"lepton-job/1"``) names the typed model and
  version that ``core.messages`` parses it with. This module never looks inside it.

:func:`open_message` rejects anything that is not exactly what the reader expects, with a
:class:`MessageRejected` whose :class:`RejectReason` says why (forged, tampered, moved, replayed, expired,
unknown version, not bound to the job) and whose message names the field — so the coordinator can exclude
the one site with its reason and carry on with the run. It verifies the signature with a public key pinned
at enrollment and never needs the signer's Vault.

Object keys (:func:`object_key`): ``jobs/<run>/<round>/<message id>.json`` (coordinator → site),
``answers/...`` and ``refusals/...`` (site → coordinator); ``<round>`` is zero-padded to 4 digits so that
listings sort by round. A site's announcement of new staged data (``announcements/<dataset>/<id>.json``) uses
the same envelope with its own header, bound to a dataset instead of a run: ``core.announcements``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from collections.abc import Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    UUID4,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from lepton_tasks.core.signatures import PublicKey, Signer, fingerprint, parse_signature, verify

__all__ = [
    "ID_PATTERN",
    "KIND_PREFIX",
    "MAX_MESSAGE_BYTES",
    "RUN_ID_PATTERN",
    "SITE_WRITTEN_PREFIXES",
    "AnswerHeader",
    "Expectation",
    "Header",
    "JobHeader",
    "JobRef",
    "MessageKind",
    "MessageRejected",
    "ObjectKey",
    "RefusalHeader",
    "RejectReason",
    "SignedMessage",
    "canonical_json",
    "job_ref",
    "make_header",
    "object_key",
    "open_message",
    "parse_header",
    "parse_object_key",
    "prefix_for",
    "reply_header",
    "seal",
    "sha256_hex",
]

#: site and consortium ids: the partner-name rule of ``ops.partners`` (lower case, digits, inner hyphens)
ID_PATTERN: Final = r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$"
#: run ids become one path segment of an object key
RUN_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BUCKET_PATTERN: Final = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
#: ``<name>/<version>``, e.g. ``lepton-job/1``: which typed model (core.messages) parses the payload
PAYLOAD_SCHEMA_PATTERN: Final = r"^[a-z][a-z0-9_.-]{0,63}/[1-9][0-9]{0,5}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
#: the largest serialized message :func:`open_message` reads (payload base64-encoded inside)
MAX_MESSAGE_BYTES: Final = 512 * 1024 * 1024

ENVELOPE_FIELDS: Final = frozenset({"schema_version", "header", "signature", "payload"})


def _model_config() -> ConfigDict:
    # strict: no coercion ("1" is not 1); the canonical round trip in open_message rejects the rest
    return ConfigDict(extra="forbid", frozen=True, strict=True)


class MessageKind(StrEnum):
    JOB = "job"  # coordinator → site
    ANSWER = "answer"  # site → coordinator: the work asked for
    REFUSAL = "refusal"  # site → coordinator: why the site will not do it
    #: site → coordinator: "new staged data for a dataset" (``core.announcements``: its own header, no run)
    ANNOUNCEMENT = "announcement"


#: the object-key prefix of each kind
KIND_PREFIX: Final[dict[MessageKind, str]] = {
    MessageKind.JOB: "jobs",
    MessageKind.ANSWER: "answers",
    MessageKind.REFUSAL: "refusals",
    MessageKind.ANNOUNCEMENT: "announcements",
}
#: what a site writes into its exchange bucket (the outbound log reconciles exactly these)
SITE_WRITTEN_PREFIXES: Final = (
    f"{KIND_PREFIX[MessageKind.ANSWER]}/",
    f"{KIND_PREFIX[MessageKind.REFUSAL]}/",
    f"{KIND_PREFIX[MessageKind.ANNOUNCEMENT]}/",
)


class RejectReason(StrEnum):
    """Why :func:`open_message` refused a message (stable codes: logged, reported, tested)."""

    MALFORMED = "malformed"  # not an envelope: bad JSON, missing/extra/mistyped field, non-canonical header
    OVERSIZED = "oversized"  # larger than the reader accepts
    UNKNOWN_SCHEMA_VERSION = (
        "unknown_schema_version"  # an envelope or header version this reader doesn't know
    )
    BAD_SIGNATURE = "bad_signature"  # forged, signed by another key, or the header was altered
    TAMPERED_PAYLOAD = "tampered_payload"  # the payload's hash or size differs from the signed header's
    MOVED = "moved"  # read from another bucket/key, or addressed to another site/consortium
    WRONG_KIND = "wrong_kind"  # e.g. a job where an answer was expected
    WRONG_PAYLOAD_SCHEMA = "wrong_payload_schema"  # a payload model the reader does not accept here
    REPLAY = "replay"  # message id already seen, or a run/round other than the one expected
    NOT_YET_VALID = "not_yet_valid"  # created in the future (beyond the allowed clock skew)
    EXPIRED = "expired"  # past its expiry
    UNBOUND_ANSWER = "unbound_answer"  # an answer/refusal that does not name the job it answers


class MessageRejected(Exception):
    """A message failed :func:`open_message`. ``reason_code`` is machine-readable, ``message`` is for humans
    and names the offending ``field`` (also an attribute, ``None`` when the whole object is at fault)."""

    def __init__(self, reason_code: RejectReason, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{reason_code.value}: {message}")
        self.reason_code = reason_code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        """What a coordinator records when it excludes a site for this message."""
        return {"reason_code": self.reason_code.value, "field": self.field, "message": self.message}


# ----------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------


class JobRef(BaseModel):
    """Which job an answer or refusal answers: its message id and the SHA-256 of its payload."""

    model_config = _model_config()

    message_id: UUID4
    payload_sha256: str = Field(pattern=SHA256_PATTERN)


class _HeaderBase(BaseModel):
    model_config = _model_config()

    schema_version: Literal[1] = 1
    consortium: str = Field(pattern=ID_PATTERN)
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    round: int = Field(ge=0, le=999_999)
    #: the site whose exchange this is: the job's addressee, or the answer's sender
    site: str = Field(pattern=ID_PATTERN)
    #: the site's exchange bucket, where the object must be read from
    bucket: str = Field(pattern=BUCKET_PATTERN)
    message_id: UUID4
    payload_schema: str = Field(pattern=PAYLOAD_SCHEMA_PATTERN)
    payload_sha256: str = Field(pattern=SHA256_PATTERN)
    payload_size: int = Field(ge=0)
    created_at: AwareDatetime
    expires_at: AwareDatetime

    @field_validator("created_at", "expires_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _expiry_after_creation(self) -> _HeaderBase:
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at must be later than created_at")
        return self


class JobHeader(_HeaderBase):
    """Header of a job (coordinator → site)."""

    kind: Literal[MessageKind.JOB] = MessageKind.JOB


class AnswerHeader(_HeaderBase):
    """Header of an answer (site → coordinator), bound to the job it answers."""

    kind: Literal[MessageKind.ANSWER] = MessageKind.ANSWER
    in_reply_to: JobRef


class RefusalHeader(_HeaderBase):
    """Header of a refusal (site → coordinator), bound to the job it refuses."""

    kind: Literal[MessageKind.REFUSAL] = MessageKind.REFUSAL
    in_reply_to: JobRef


Header = Annotated[JobHeader | AnswerHeader | RefusalHeader, Field(discriminator="kind")]
_HEADER: TypeAdapter[JobHeader | AnswerHeader | RefusalHeader] = TypeAdapter(Header)


class SignedMessage(BaseModel):
    """The object in the exchange bucket (documentation and writer side; :func:`open_message` reads it
    field by field so that the signature is checked before the header is trusted)."""

    model_config = _model_config()

    schema_version: Literal[1] = 1
    header: Header
    #: ``vault:vN:<base64>``: Ed25519 over :func:`canonical_json` of the header
    signature: str
    #: standard base64 of the payload bytes
    payload: str


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only, no NaN: the same value always gives the same bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_bytes(header: JobHeader | AnswerHeader | RefusalHeader) -> bytes:
    """The bytes that are signed: the canonical JSON of ``header``."""
    return canonical_json(header.model_dump(mode="json"))


def job_ref(job: JobHeader) -> JobRef:
    return JobRef(message_id=job.message_id, payload_sha256=job.payload_sha256)


@dataclass(frozen=True)
class ObjectKey:
    """The parts of an exchange object key."""

    kind: MessageKind
    run_id: str
    round: int
    message_id: uuid.UUID


_KIND_BY_PREFIX = {prefix: kind for kind, prefix in KIND_PREFIX.items()}
_OBJECT_KEY_RE = re.compile(
    r"(?P<prefix>jobs|answers|refusals)/(?P<run>[A-Za-z0-9][A-Za-z0-9._-]{0,127})/(?P<round>[0-9]{4,6})/"
    r"(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\.json"
)


def _key(kind: MessageKind, run_id: str, round_: int, message_id: uuid.UUID) -> str:
    return f"{KIND_PREFIX[kind]}/{run_id}/{round_:04d}/{message_id}.json"


def object_key(header: JobHeader | AnswerHeader | RefusalHeader) -> str:
    """Where ``header``'s message lives in the site's exchange bucket."""
    return _key(header.kind, header.run_id, header.round, header.message_id)


def prefix_for(kind: MessageKind, run_id: str | None = None, round: int | None = None) -> str:
    """The listing prefix of ``kind`` messages (of one run, of one round)."""
    if round is not None and run_id is None:
        raise ValueError("a round prefix needs the run id")
    parts = [KIND_PREFIX[kind]]
    if run_id is not None:
        parts.append(run_id)
    if round is not None:
        parts.append(f"{round:04d}")
    return "/".join(parts) + "/"


def parse_object_key(key: str) -> ObjectKey:
    """The parts of an exchange object key; :class:`ValueError` for anything :func:`object_key` would not
    have produced (a trigger listing the bucket skips those and reports them)."""
    m = _OBJECT_KEY_RE.fullmatch(key)
    if m is None:
        raise ValueError(
            f"{key!r} is not an exchange object key (<jobs|answers|refusals>/<run>/<round>/<id>.json)"
        )
    parts = ObjectKey(_KIND_BY_PREFIX[m["prefix"]], m["run"], int(m["round"]), uuid.UUID(m["id"]))
    if _key(parts.kind, parts.run_id, parts.round, parts.message_id) != key:  # e.g. round "00001"
        raise ValueError(f"{key!r} is not in canonical form")
    return parts


def make_header(
    kind: MessageKind,
    *,
    consortium: str,
    run_id: str,
    round: int,
    site: str,
    bucket: str,
    payload: bytes,
    payload_schema: str,
    ttl: timedelta,
    in_reply_to: JobRef | None = None,
    now: datetime | None = None,
    message_id: uuid.UUID | None = None,
) -> JobHeader | AnswerHeader | RefusalHeader:
    """A new header for ``payload``: fresh message id, ``created_at = now``, ``expires_at = now + ttl``."""
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    if kind is MessageKind.ANNOUNCEMENT:
        raise ValueError("an announcement has its own header: core.announcements.make_announcement")
    created = (now or datetime.now(UTC)).astimezone(UTC)
    common: dict[str, Any] = {
        "consortium": consortium,
        "run_id": run_id,
        "round": round,
        "site": site,
        "bucket": bucket,
        "message_id": message_id or uuid.uuid4(),
        "payload_schema": payload_schema,
        "payload_sha256": sha256_hex(payload),
        "payload_size": len(payload),
        "created_at": created,
        "expires_at": created + ttl,
    }
    if kind is MessageKind.JOB:
        if in_reply_to is not None:
            raise ValueError("a job answers nothing: in_reply_to must be None")
        return JobHeader(**common)
    if in_reply_to is None:
        raise ValueError(f"an {kind.value} must name the job it answers (in_reply_to)")
    if kind is MessageKind.ANSWER:
        return AnswerHeader(**common, in_reply_to=in_reply_to)
    return RefusalHeader(**common, in_reply_to=in_reply_to)


def reply_header(
    job: JobHeader,
    kind: Literal[MessageKind.ANSWER, MessageKind.REFUSAL],
    *,
    payload: bytes,
    payload_schema: str,
    ttl: timedelta,
    now: datetime | None = None,
    message_id: uuid.UUID | None = None,
) -> AnswerHeader | RefusalHeader:
    """The header of a site's answer or refusal to ``job``: same consortium, run, round, site and bucket.
    ``message_id``: when the answer's blobs were named after it before the header existed."""
    header = make_header(
        kind,
        consortium=job.consortium,
        run_id=job.run_id,
        round=job.round,
        site=job.site,
        bucket=job.bucket,
        payload=payload,
        payload_schema=payload_schema,
        ttl=ttl,
        in_reply_to=job_ref(job),
        now=now,
        message_id=message_id,
    )
    assert isinstance(header, AnswerHeader | RefusalHeader)
    return header


def parse_header(value: Any) -> JobHeader | AnswerHeader | RefusalHeader:
    """Validate a header dict (e.g. one kept in XCom after :func:`open_message`); raises ValidationError."""
    return _HEADER.validate_python(value, strict=False)


# ----------------------------------------------------------------------------------------------------
# seal / open
# ----------------------------------------------------------------------------------------------------


def seal(header: JobHeader | AnswerHeader | RefusalHeader, payload: bytes, signer: Signer) -> bytes:
    """The signed object for ``header`` + ``payload`` (bytes to put at :func:`object_key` in the bucket).

    Raises :class:`ValueError` when the header does not describe this payload, or when the signer returns
    something that is not a ``vault:vN:<b64>`` signature.
    """
    if header.payload_sha256 != sha256_hex(payload) or header.payload_size != len(payload):
        raise ValueError("header.payload_sha256/payload_size do not describe this payload")
    header_doc = header.model_dump(mode="json")
    signature = signer.sign(canonical_json(header_doc))
    parse_signature(signature)  # raises ValueError on a malformed signature
    return canonical_json(
        {
            "schema_version": 1,
            "header": header_doc,
            "signature": signature,
            "payload": base64.b64encode(payload).decode("ascii"),
        }
    )


class Expectation(BaseModel):
    """What the reader expects of the message it is about to open: where it read it from, for whom, which
    kind, which run and round, and (for answers) which job it must answer.

    Build it from the reader's OWN state, never from the message: :meth:`for_job` (a site reading its
    exchange) and :meth:`for_reply` (the coordinator reading a site's answer to the job it sent).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    consortium: str
    site: str
    bucket: str
    #: the key the object was read from
    object_key: str
    kinds: frozenset[MessageKind]
    #: the run the reader is in; ``None`` when a site accepts a job of a run it does not know yet
    run_id: str | None = None
    #: the exact round expected (``None``: any round ≥ ``min_round``)
    round: int | None = None
    #: rounds below this are stale (a site passes the round after the last one it answered)
    min_round: int = 0
    #: the job an answer or refusal must answer (required when ``kinds`` has those)
    answers_job: JobRef | None = None
    #: accepted ``payload_schema`` values (``None``: any; core.messages checks the payload itself)
    payload_schemas: frozenset[str] | None = None
    #: how far in the future ``created_at`` may be (clocks of different organizations differ)
    clock_skew: timedelta = timedelta(minutes=5)
    max_bytes: int = MAX_MESSAGE_BYTES

    @model_validator(mode="after")
    def _consistent(self) -> Expectation:
        if not self.kinds:
            raise ValueError("kinds must name at least one message kind")
        replies = self.kinds & {MessageKind.ANSWER, MessageKind.REFUSAL}
        if replies and self.answers_job is None:
            raise ValueError("expecting an answer or refusal needs answers_job (the job that was sent)")
        if self.round is not None and self.round < self.min_round:
            raise ValueError("round is below min_round")
        return self

    @classmethod
    def for_job(
        cls,
        *,
        consortium: str,
        site: str,
        bucket: str,
        object_key: str,
        run_id: str | None = None,
        round: int | None = None,
        min_round: int = 0,
        payload_schemas: frozenset[str] | None = None,
    ) -> Expectation:
        """A site reading a job from its exchange bucket."""
        return cls(
            consortium=consortium,
            site=site,
            bucket=bucket,
            object_key=object_key,
            kinds=frozenset({MessageKind.JOB}),
            run_id=run_id,
            round=round,
            min_round=min_round,
            payload_schemas=payload_schemas,
        )

    @classmethod
    def for_reply(
        cls, job: JobHeader, *, object_key: str, payload_schemas: frozenset[str] | None = None
    ) -> Expectation:
        """The coordinator reading ``job.site``'s answer or refusal to ``job`` (the header it sealed)."""
        return cls(
            consortium=job.consortium,
            site=job.site,
            bucket=job.bucket,
            object_key=object_key,
            kinds=frozenset({MessageKind.ANSWER, MessageKind.REFUSAL}),
            run_id=job.run_id,
            round=job.round,
            min_round=job.round,
            answers_job=job_ref(job),
            payload_schemas=payload_schemas,
        )


def _reject(reason: RejectReason, message: str, field: str | None = None) -> MessageRejected:
    return MessageRejected(reason, message, field=field)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _reject(RejectReason.MALFORMED, f"field {key!r} appears twice", key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise _reject(RejectReason.MALFORMED, f"{name} is not valid JSON")


def _strict_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _reject(RejectReason.MALFORMED, f"the object is not UTF-8 ({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise _reject(RejectReason.MALFORMED, f"the object is not JSON ({exc.msg} at {exc.pos})") from None


def _is_version_1(value: Any) -> bool:
    return type(value) is int and value == 1


def _field_of(err: Any) -> str:
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return "header.kind"
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in {k.value for k in MessageKind}:  # the discriminated union's tag
        loc = loc[1:]
    return ".".join(["header", *loc])


def open_message(
    raw: bytes,
    *,
    expected: Expectation,
    public_key: str | PublicKey,
    seen_ids: Container[uuid.UUID],
    now: datetime | None = None,
) -> tuple[JobHeader | AnswerHeader | RefusalHeader, bytes]:
    """Check ``raw`` (an object read from ``expected.bucket``/``expected.object_key``) and return its header
    and payload, or raise :class:`MessageRejected`.

    ``public_key`` is the sender's pinned key (base64; a :class:`PublicKey` also pins its version).
    ``seen_ids`` holds the message ids the reader already accepted; this function does not add to it —
    record ``header.message_id`` once the message has been processed. A malformed ``public_key`` is the
    reader's own configuration error and raises :class:`ValueError`, not :class:`MessageRejected`.

    Order of checks: size → structure → schema versions → signature → header fields → payload hash →
    addressing (moved) → kind → payload schema → run/round/id (replay) → time → binding to the job. Nothing
    from the header is trusted before the signature over it has been verified.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if len(raw) > expected.max_bytes:
        raise _reject(
            RejectReason.OVERSIZED, f"the object is {len(raw)} bytes, over the {expected.max_bytes} limit"
        )

    # structure and versions -----------------------------------------------------------------------
    doc = _strict_json(raw)
    if not isinstance(doc, dict):
        raise _reject(RejectReason.MALFORMED, "the object is not a JSON object")
    if "schema_version" not in doc:
        raise _reject(RejectReason.MALFORMED, "field schema_version is missing", "schema_version")
    if not _is_version_1(doc["schema_version"]):
        raise _reject(
            RejectReason.UNKNOWN_SCHEMA_VERSION,
            f"envelope schema_version {doc['schema_version']!r} is not one this reader knows (1)",
            "schema_version",
        )
    if missing := sorted(ENVELOPE_FIELDS - doc.keys()):
        raise _reject(RejectReason.MALFORMED, f"field {missing[0]} is missing", missing[0])
    if extra := sorted(doc.keys() - ENVELOPE_FIELDS):
        raise _reject(RejectReason.MALFORMED, f"field {extra[0]} is not part of the envelope", extra[0])
    header_doc = doc["header"]
    if not isinstance(header_doc, dict):
        raise _reject(RejectReason.MALFORMED, "field header is not an object", "header")
    if "schema_version" in header_doc and not _is_version_1(header_doc["schema_version"]):
        raise _reject(
            RejectReason.UNKNOWN_SCHEMA_VERSION,
            f"header schema_version {header_doc['schema_version']!r} is not one this reader knows (1)",
            "header.schema_version",
        )

    # signature: over the canonical JSON of the header as received ----------------------------------------
    signed = canonical_json(header_doc)
    signature = doc["signature"]
    key_b64 = public_key.public_key_b64 if isinstance(public_key, PublicKey) else public_key
    key_version = public_key.version if isinstance(public_key, PublicKey) else None
    if not isinstance(signature, str) or not verify(key_b64, signed, signature, key_version=key_version):
        raise _reject(
            RejectReason.BAD_SIGNATURE,
            "field signature does not verify under the pinned key "
            f"{fingerprint(key_b64)}"
            + (f" version {key_version}" if key_version is not None else "")
            + ": forged, signed by another key, or the header was altered",
            "signature",
        )

    # header fields (signed by the expected key, so a failure here is the signer's bug) -------------------
    try:
        header = _HEADER.validate_json(signed)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _reject(
            RejectReason.MALFORMED, f"field {_field_of(err)}: {err['msg']}", _field_of(err)
        ) from None
    if header_bytes(header) != signed:
        raise _reject(
            RejectReason.MALFORMED,
            "field header is not in canonical form (e.g. a non-UTC time or an upper-case id)",
            "header",
        )

    # payload --------------------------------------------------------------------------------------
    payload_b64 = doc["payload"]
    try:
        if not isinstance(payload_b64, str):
            raise ValueError
        payload = base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _reject(
            RejectReason.TAMPERED_PAYLOAD, "field payload is not standard base64", "payload"
        ) from None
    if len(payload) != header.payload_size:
        raise _reject(
            RejectReason.TAMPERED_PAYLOAD,
            f"the payload is {len(payload)} bytes but header.payload_size says {header.payload_size}",
            "header.payload_size",
        )
    if sha256_hex(payload) != header.payload_sha256:
        raise _reject(
            RejectReason.TAMPERED_PAYLOAD,
            "the payload's SHA-256 differs from header.payload_sha256",
            "header.payload_sha256",
        )

    # addressing: consortium, site, bucket, object key ---------------------------------------------
    for name, have, want in (
        ("consortium", header.consortium, expected.consortium),
        ("site", header.site, expected.site),
        ("bucket", header.bucket, expected.bucket),
    ):
        if have != want:
            raise _reject(
                RejectReason.MOVED,
                f"header.{name} is {have!r}, but this reader is {want!r}",
                f"header.{name}",
            )
    if (where := object_key(header)) != expected.object_key:
        raise _reject(
            RejectReason.MOVED,
            f"the message belongs at {where!r} but was read from {expected.object_key!r}",
            "object_key",
        )

    # kind and payload model -----------------------------------------------------------------------
    if header.kind not in expected.kinds:
        want_kinds = " or ".join(sorted(k.value for k in expected.kinds))
        raise _reject(
            RejectReason.WRONG_KIND,
            f"header.kind is {header.kind.value!r}, expected {want_kinds}",
            "header.kind",
        )
    if expected.payload_schemas is not None and header.payload_schema not in expected.payload_schemas:
        raise _reject(
            RejectReason.WRONG_PAYLOAD_SCHEMA,
            f"header.payload_schema {header.payload_schema!r} is not one of "
            f"{sorted(expected.payload_schemas)}",
            "header.payload_schema",
        )

    # freshness: run, round, message id ------------------------------------------------------------
    if expected.run_id is not None and header.run_id != expected.run_id:
        raise _reject(
            RejectReason.REPLAY,
            f"header.run_id is {header.run_id!r}, expected {expected.run_id!r}",
            "header.run_id",
        )
    if expected.round is not None and header.round != expected.round:
        raise _reject(
            RejectReason.REPLAY, f"header.round is {header.round}, expected {expected.round}", "header.round"
        )
    if header.round < expected.min_round:
        raise _reject(
            RejectReason.REPLAY,
            f"header.round {header.round} is before round {expected.min_round}, already past",
            "header.round",
        )
    if header.message_id in seen_ids:
        raise _reject(
            RejectReason.REPLAY,
            f"header.message_id {header.message_id} was already received",
            "header.message_id",
        )

    # time -----------------------------------------------------------------------------------------
    if header.created_at > now + expected.clock_skew:
        raise _reject(
            RejectReason.NOT_YET_VALID,
            f"header.created_at {header.created_at.isoformat()} is in the future (now {now.isoformat()})",
            "header.created_at",
        )
    if now >= header.expires_at:
        raise _reject(
            RejectReason.EXPIRED,
            f"header.expires_at {header.expires_at.isoformat()} has passed (now {now.isoformat()})",
            "header.expires_at",
        )

    # binding of a reply to its job ----------------------------------------------------------------
    if isinstance(header, AnswerHeader | RefusalHeader):
        job = expected.answers_job
        assert job is not None  # Expectation guarantees it when replies are expected
        if header.in_reply_to.message_id != job.message_id:
            raise _reject(
                RejectReason.UNBOUND_ANSWER,
                f"header.in_reply_to.message_id is {header.in_reply_to.message_id}, "
                f"but the job sent was {job.message_id}",
                "header.in_reply_to.message_id",
            )
        if header.in_reply_to.payload_sha256 != job.payload_sha256:
            raise _reject(
                RejectReason.UNBOUND_ANSWER,
                "header.in_reply_to.payload_sha256 differs from the payload of the job sent",
                "header.in_reply_to.payload_sha256",
            )
    return header, payload
