"""Quarantine: a rejected drop moves to its partner's own ``quarantine/`` folder with why and how to fix it.

Layout (the drop id is the first 16 hex digits of the SHA-256 of the bytes, so identical bytes share a
folder whatever key they arrived under)::

    inbox-<partner>/quarantine/<dataset>/<drop_id>/<sha256(key)[:12]>.original   one per inbox key
    inbox-<partner>/quarantine/<dataset>/<drop_id>/reason.json                   QuarantineReason
    inbox-<partner>/quarantine/<dataset>/<drop_id>/validation.html               when validation ran
    quarantine/<partner>/<drop_id>.json          operator index: code/file/row/column, no values or rows

The same bad bytes uploaded under several keys keep every original (each key has its own file name) and one
``reason.json`` whose ``object_keys`` lists every key, in the order they were quarantined; ``object_key`` and
``original`` name the latest. The original is removed from the inbox only after its copy and the reason
exist: nothing is lost if a step fails.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.core.contracts import available
from lepton_tasks.core.drops import DropError
from lepton_tasks.core.messages import MessageError, QuarantineReason, dump, load

__all__ = ["QUARANTINE_PREFIX", "original_name", "quarantine_drop", "quarantine_folder"]

log = logging.getLogger(__name__)

QUARANTINE_PREFIX = "quarantine/"
REASON = "reason.json"


def quarantine_folder(object_key: str, drop_id: str) -> str:
    """``quarantine/<dataset>/<drop_id>/`` in the partner's inbox (``_unknown`` for a key with no dataset)."""
    dataset = object_key.split("/", 1)[0] if "/" in object_key else "_root"
    safe_ds = dataset if dataset in available() else "_unknown"
    return f"{QUARANTINE_PREFIX}{safe_ds}/{drop_id}/"


def original_name(object_key: str) -> str:
    """The file name the original of ``object_key`` gets in the quarantine folder."""
    return hashlib.sha256(object_key.encode()).hexdigest()[:12] + ".original"


def _earlier_keys(storage: Storage, bucket: str, reason_key: str) -> list[str]:
    """The inbox keys an earlier ``reason.json`` in this folder names (none when there is none)."""
    if not storage.exists(bucket, reason_key):
        return []
    where = f"s3://{bucket}/{reason_key}"
    try:
        earlier = load(QuarantineReason, storage.get_bytes(bucket, reason_key), where=where)
    except MessageError as exc:  # an unreadable earlier reason: keep what can be kept, say so
        log.warning("%s: replacing an unreadable quarantine reason: %s", where, exc)
        return []
    return list(earlier.object_keys) or [earlier.object_key]


def quarantine_drop(
    storage: Storage,
    settings: Settings,
    partner: str,
    object_key: str,
    drop_id: str,
    error: DropError,
    validation_html: str | None,
) -> dict[str, Any]:
    """Move ``object_key`` into ``partner``'s quarantine folder with ``reason.json``; return the reason."""
    bucket = settings.inbox_bucket(partner)
    base = quarantine_folder(object_key, drop_id)
    original = base + original_name(object_key)
    keys = _earlier_keys(storage, bucket, base + REASON)
    keys = [*(k for k in keys if k != object_key), object_key]
    reason = dump(
        QuarantineReason(
            **error.to_reason(),
            partner=partner,
            object_key=object_key,
            object_keys=keys,
            drop_id=drop_id,
            original=f"s3://{bucket}/{original}",
            quarantined_at=datetime.now(UTC),
        )
    )
    storage.copy(bucket, object_key, bucket, original)
    storage.put_json(bucket, base + REASON, reason)
    if validation_html:
        storage.put_bytes(
            bucket, base + "validation.html", validation_html.encode(), content_type="text/html"
        )
    # operator index in the shared bucket: where and what kind of failure, never values or rows
    storage.put_json(
        settings.quarantine_bucket,
        f"{partner}/{drop_id}.json",
        {
            "partner": partner,
            "object_key": object_key,
            "object_keys": keys,
            "code": error.code,
            "row": error.row,
            "column": error.column,
            "details": f"s3://{bucket}/{base}{REASON}",
        },
    )
    storage.remove(bucket, object_key)  # moved, after the copy and reason exist: nothing is lost
    return reason
