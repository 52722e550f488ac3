"""A site's signed announcement of new staged data: ``announcements/<dataset>/<message id>.json``.

When a site's ingest stages new data for a dataset it may tell the coordinator, which can then start a
training run (``lepton_federated`` is scheduled on it). The announcement is one object in the site's exchange
bucket, in the same signed envelope as answers (``core.exchange``: ``{"schema_version", "header", "payload",
"signature"}``, Ed25519 over the canonical JSON of the header, the payload covered by its SHA-256), with its
own header, :class:`AnnouncementHeader` (``kind: "announcement"``): bound to the consortium, the site, its
exchange bucket and the **dataset** (there is no run or round yet), carrying the payload's hash and size, a
unique id, a creation time and an expiry. The payload is a :class:`~lepton_tasks.core.messages.
StagedAnnouncement` (``lepton-staged-announcement/1``): dataset, contract version tag and SHA-256, time.
It says *that* a site has new data for a dataset, and when; nothing about the data.

Because ``kind`` is inside the signed header, a site's signed announcement can never be read as an answer or
a job, nor the reverse (:func:`open_announcement` accepts only ``kind: "announcement"``, and
``exchange.open_message`` rejects that kind).

:func:`open_announcement` rejects, with the :class:`~lepton_tasks.core.exchange.MessageRejected` reasons of
``core.exchange``: a malformed object, a bad signature (forged, another site's key, an altered header), a
tampered payload, a moved one (another consortium, site, bucket, dataset or key than where it was read), an
unknown payload model, a message id already seen, a creation time in the future or an expired one, and a
payload that names another dataset than its header.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Container
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from pydantic import UUID4, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton_tasks.core.exchange import (
    BUCKET_PATTERN,
    ID_PATTERN,
    KIND_PREFIX,
    MAX_MESSAGE_BYTES,
    SHA256_PATTERN,
    MessageKind,
    MessageRejected,
    RejectReason,
    canonical_json,
    sha256_hex,
)
from lepton_tasks.core.exchange import _is_version_1 as is_version_1
from lepton_tasks.core.exchange import _strict_json as strict_json
from lepton_tasks.core.messages import DATASET_PATTERN, MessageError, StagedAnnouncement, load
from lepton_tasks.core.signatures import PublicKey, Signer, fingerprint, parse_signature, verify

__all__ = [
    "ANNOUNCEMENT_PREFIX",
    "ANNOUNCEMENT_TTL",
    "AnnouncementHeader",
    "announcement_key",
    "make_announcement",
    "open_announcement",
    "parse_announcement_key",
]

ANNOUNCEMENT_PREFIX: Final = f"{KIND_PREFIX[MessageKind.ANNOUNCEMENT]}/"
#: an announcement the coordinator has not read within this long is stale (a run would be on old news)
ANNOUNCEMENT_TTL: Final = timedelta(days=7)
_KEY_RE = re.compile(
    r"announcements/(?P<dataset>[a-z][a-z0-9_-]{0,62})/"
    r"(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\.json"
)


class AnnouncementHeader(BaseModel):
    """The signed header of an announcement (site → coordinator), bound to a dataset rather than a run."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = 1
    kind: Literal[MessageKind.ANNOUNCEMENT] = MessageKind.ANNOUNCEMENT
    consortium: str = Field(pattern=ID_PATTERN)
    #: the announcing site (the signer)
    site: str = Field(pattern=ID_PATTERN)
    #: the site's exchange bucket, where the object must be read from
    bucket: str = Field(pattern=BUCKET_PATTERN)
    dataset: str = Field(pattern=DATASET_PATTERN)
    message_id: UUID4
    payload_schema: Literal["lepton-staged-announcement/1"] = "lepton-staged-announcement/1"
    payload_sha256: str = Field(pattern=SHA256_PATTERN)
    payload_size: int = Field(ge=0)
    created_at: AwareDatetime
    expires_at: AwareDatetime

    @field_validator("created_at", "expires_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


def announcement_key(dataset: str, message_id: uuid.UUID) -> str:
    """Where an announcement lives in the site's exchange bucket."""
    return f"{ANNOUNCEMENT_PREFIX}{dataset}/{message_id}.json"


def parse_announcement_key(key: str) -> tuple[str, uuid.UUID]:
    """``(dataset, message id)`` of an announcement key; :class:`ValueError` for anything else."""
    m = _KEY_RE.fullmatch(key)
    if m is None:
        raise ValueError(f"{key!r} is not an announcement key (announcements/<dataset>/<id>.json)")
    return m["dataset"], uuid.UUID(m["id"])


def make_announcement(
    *,
    consortium: str,
    site: str,
    bucket: str,
    dataset: str,
    contract_version: str,
    contract_sha256: str,
    signer: Signer,
    now: datetime | None = None,
    ttl: timedelta = ANNOUNCEMENT_TTL,
    message_id: uuid.UUID | None = None,
) -> tuple[str, bytes, AnnouncementHeader]:
    """``(object key, signed object, header)`` announcing new staged data for ``dataset``."""
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    created = (now or datetime.now(UTC)).astimezone(UTC)
    body = StagedAnnouncement(
        dataset=dataset,
        contract_version=contract_version,
        contract_sha256=contract_sha256,
        announced_at=created,
    )
    payload = canonical_json(body.model_dump(mode="json"))
    header = AnnouncementHeader(
        consortium=consortium,
        site=site,
        bucket=bucket,
        dataset=dataset,
        message_id=message_id or uuid.uuid4(),
        payload_sha256=sha256_hex(payload),
        payload_size=len(payload),
        created_at=created,
        expires_at=created + ttl,
    )
    header_doc = header.model_dump(mode="json")
    signature = signer.sign(canonical_json(header_doc))
    parse_signature(signature)  # raises ValueError on a malformed signature
    raw = canonical_json(
        {
            "schema_version": 1,
            "header": header_doc,
            "signature": signature,
            "payload": base64.b64encode(payload).decode("ascii"),
        }
    )
    return announcement_key(dataset, header.message_id), raw, header


def _reject(reason: RejectReason, message: str, field: str | None = None) -> MessageRejected:
    return MessageRejected(reason, message, field=field)


ENVELOPE_FIELDS: Final = frozenset({"schema_version", "header", "signature", "payload"})


def open_announcement(
    raw: bytes,
    *,
    consortium: str,
    site: str,
    bucket: str,
    object_key: str,
    public_key: str | PublicKey,
    seen_ids: Container[uuid.UUID] = (),
    now: datetime | None = None,
    clock_skew: timedelta = timedelta(minutes=5),
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[AnnouncementHeader, StagedAnnouncement]:
    """Check ``raw`` (read from ``bucket``/``object_key``, the exchange of ``site`` in ``consortium``) and
    return its header and payload, or raise :class:`MessageRejected`. ``public_key``: the site's pinned key.
    Nothing from the header is trusted before the signature over it has been verified."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if len(raw) > max_bytes:
        raise _reject(RejectReason.OVERSIZED, f"the object is {len(raw)} bytes, over the {max_bytes} limit")
    doc = strict_json(raw)
    if not isinstance(doc, dict):
        raise _reject(RejectReason.MALFORMED, "the object is not a JSON object")
    if "schema_version" not in doc:
        raise _reject(RejectReason.MALFORMED, "field schema_version is missing", "schema_version")
    if not is_version_1(doc["schema_version"]):
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

    # signature -------------------------------------------------------------------------------------
    signed = canonical_json(header_doc)
    signature = doc["signature"]
    key_b64 = public_key.public_key_b64 if isinstance(public_key, PublicKey) else public_key
    key_version = public_key.version if isinstance(public_key, PublicKey) else None
    if not isinstance(signature, str) or not verify(key_b64, signed, signature, key_version=key_version):
        raise _reject(
            RejectReason.BAD_SIGNATURE,
            f"field signature does not verify under the pinned key {fingerprint(key_b64)}"
            + (f" version {key_version}" if key_version is not None else "")
            + ": forged, signed by another key, or the header was altered",
            "signature",
        )

    # header ----------------------------------------------------------------------------------------
    if header_doc.get("kind") != MessageKind.ANNOUNCEMENT.value:
        raise _reject(
            RejectReason.WRONG_KIND,
            f"header.kind is {header_doc.get('kind')!r}, expected 'announcement'",
            "header.kind",
        )
    try:
        header = AnnouncementHeader.model_validate_json(signed)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(["header", *(str(p) for p in err["loc"])])
        reason = (
            RejectReason.WRONG_PAYLOAD_SCHEMA
            if err["loc"] == ("payload_schema",)
            else RejectReason.UNKNOWN_SCHEMA_VERSION
            if err["loc"] == ("schema_version",)
            else RejectReason.MALFORMED
        )
        raise _reject(reason, f"field {where}: {err['msg']}", where) from None
    if canonical_json(header.model_dump(mode="json")) != signed:
        raise _reject(RejectReason.MALFORMED, "field header is not in canonical form", "header")

    # payload ---------------------------------------------------------------------------------------
    payload_b64 = doc["payload"]
    try:
        if not isinstance(payload_b64, str):
            raise ValueError
        payload = base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _reject(
            RejectReason.TAMPERED_PAYLOAD, "field payload is not standard base64", "payload"
        ) from None
    if len(payload) != header.payload_size or sha256_hex(payload) != header.payload_sha256:
        raise _reject(
            RejectReason.TAMPERED_PAYLOAD,
            "the payload's size or SHA-256 differs from the signed header's",
            "header.payload_sha256",
        )

    # addressing ------------------------------------------------------------------------------------
    for name, have, want in (
        ("consortium", header.consortium, consortium),
        ("site", header.site, site),
        ("bucket", header.bucket, bucket),
    ):
        if have != want:
            raise _reject(
                RejectReason.MOVED,
                f"header.{name} is {have!r}, but this reader is {want!r}",
                f"header.{name}",
            )
    if (where := announcement_key(header.dataset, header.message_id)) != object_key:
        raise _reject(
            RejectReason.MOVED,
            f"the message belongs at {where!r} but was read from {object_key!r}",
            "object_key",
        )

    # freshness -------------------------------------------------------------------------------------
    if header.message_id in seen_ids:
        raise _reject(
            RejectReason.REPLAY,
            f"header.message_id {header.message_id} was already received",
            "header.message_id",
        )
    if header.created_at > now + clock_skew:
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

    # the payload model, bound to the header's dataset ----------------------------------------------
    try:
        body = load(StagedAnnouncement, payload, where=object_key)
    except MessageError as exc:
        raise _reject(RejectReason.MALFORMED, str(exc), "payload") from None
    if body.dataset != header.dataset:
        raise _reject(
            RejectReason.MOVED,
            f"the payload announces {body.dataset!r} but the signed header is for {header.dataset!r}",
            "payload.dataset",
        )
    return header, body
