"""Coordinator side of announcements: which datasets did the sites announce new staged data for?

:func:`poll_announcements` lists ``announcements/`` in the exchange bucket of every enrolled site whose key is
pinned (in this consortium), reads each object it has not seen before and verifies it with the site's PINNED
key (:func:`lepton_tasks.core.announcements.open_announcement`): a forged, moved, tampered, replayed or
expired announcement is rejected and logged, and never reported. The keys it has seen (accepted or rejected)
are kept in the coordinator's own storage (``<models bucket>/announcements/seen.json``: per site, the seen
keys still listed), so each announcement is reported once, whatever restarts; keys the bucket no longer
lists are forgotten.

The ``lepton_federated`` DAG is scheduled on the ``lepton-announcements`` Asset, whose watcher
(``lepton_airflow.announcements_trigger``) fires one event per announced dataset with the announcing sites;
:func:`announced_dataset` picks the dataset a triggered run trains on from those events' extras.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from lepton_tasks.adapters.storage import Storage, StorageError
from lepton_tasks.core.announcements import ANNOUNCEMENT_PREFIX, open_announcement, parse_announcement_key
from lepton_tasks.core.exchange import MessageRejected, RejectReason
from lepton_tasks.federation.enrollment import SiteRegistry

__all__ = [
    "SEEN_KEY",
    "Announcement",
    "AnnouncementPoll",
    "RejectedAnnouncement",
    "announced_dataset",
    "poll_announcements",
]

log = logging.getLogger(__name__)

#: the coordinator's memory of the announcement keys it has read (in its models bucket)
SEEN_KEY: Final = "announcements/seen.json"
SEEN_SCHEMA_VERSION: Final = 1


@dataclass(frozen=True)
class Announcement:
    """One verified announcement: ``site`` staged new data for ``dataset`` (under ``contract_version``)."""

    site: str
    dataset: str
    contract_version: str
    key: str
    message_id: uuid.UUID
    announced_at: datetime


@dataclass(frozen=True)
class RejectedAnnouncement:
    """An object under ``announcements/`` of ``site``'s bucket that failed verification, and why."""

    site: str
    key: str
    reason: dict[str, str | None]


@dataclass
class AnnouncementPoll:
    """What one poll found: the new verified announcements and the rejected objects."""

    accepted: list[Announcement] = field(default_factory=list)
    rejected: list[RejectedAnnouncement] = field(default_factory=list)

    def by_dataset(self) -> dict[str, list[str]]:
        """``{dataset: sorted announcing sites}`` of the accepted announcements."""
        out: dict[str, set[str]] = {}
        for a in self.accepted:
            out.setdefault(a.dataset, set()).add(a.site)
        return {d: sorted(sites) for d, sites in sorted(out.items())}


def _read_seen(storage: Storage, bucket: str) -> dict[str, list[str]]:
    if not storage.exists(bucket, SEEN_KEY):
        return {}
    doc = json.loads(storage.get_bytes(bucket, SEEN_KEY))
    if not isinstance(doc, dict) or doc.get("schema_version") != SEEN_SCHEMA_VERSION:
        raise ValueError(f"s3://{bucket}/{SEEN_KEY}: not a version-{SEEN_SCHEMA_VERSION} seen-set")
    sites = doc.get("sites") or {}
    return {str(s): [str(k) for k in keys] for s, keys in sites.items()}


def _write_seen(storage: Storage, bucket: str, seen: Mapping[str, list[str]]) -> None:
    doc = {"schema_version": SEEN_SCHEMA_VERSION, "sites": {s: sorted(k) for s, k in sorted(seen.items())}}
    storage.put_bytes(bucket, SEEN_KEY, json.dumps(doc, indent=1).encode(), content_type="application/json")


def _ids(keys: Iterable[str]) -> set[uuid.UUID]:
    out = set()
    for key in keys:
        try:
            out.add(parse_announcement_key(key)[1])
        except ValueError:
            continue
    return out


def poll_announcements(
    storage: Storage,
    bucket: str,
    registry: SiteRegistry,
    *,
    consortium: str,
    now: datetime | None = None,
) -> AnnouncementPoll:
    """The announcements no earlier poll reported, verified; remembers what it read in ``bucket``
    (:data:`SEEN_KEY`). A site whose bucket cannot be listed or read now is skipped (logged) and read
    again next time; a failure to write the seen-set raises (nothing is reported twice or lost silently)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    seen = _read_seen(storage, bucket)
    new_seen: dict[str, list[str]] = {}
    result = AnnouncementPoll()
    for site, entry in sorted(registry.load().items()):
        if not entry.pinned or entry.consortium != consortium:
            continue
        before = set(seen.get(site, []))
        try:
            listed = sorted(o.key for o in storage.list(entry.bucket, ANNOUNCEMENT_PREFIX))
        except StorageError as exc:
            log.warning("cannot list the announcements of site %s (read again next poll): %s", site, exc)
            if site in seen:
                new_seen[site] = seen[site]
            continue
        seen_ids = _ids(before)
        keep: list[str] = []
        for key in listed:
            if key in before:
                keep.append(key)
                continue
            try:
                parse_announcement_key(key)
                raw = storage.get_bytes(entry.bucket, key)
                header, body = open_announcement(
                    raw,
                    consortium=consortium,
                    site=site,
                    bucket=entry.bucket,
                    object_key=key,
                    public_key=entry.pinned_key(),
                    seen_ids=seen_ids,
                    now=now,
                )
            except StorageError as exc:
                log.warning(
                    "cannot read %s/%s of site %s (read again next poll): %s", entry.bucket, key, site, exc
                )
                continue
            except (MessageRejected, ValueError) as exc:
                reason = (
                    exc.to_dict()
                    if isinstance(exc, MessageRejected)
                    else {
                        "reason_code": RejectReason.MALFORMED.value,
                        "field": "object_key",
                        "message": str(exc),
                    }
                )
                log.warning(
                    "REJECTED announcement %s/%s of site %s: %s (it starts no run)",
                    entry.bucket,
                    key,
                    site,
                    reason["message"],
                )
                result.rejected.append(RejectedAnnouncement(site, key, reason))
                keep.append(key)
                continue
            keep.append(key)
            seen_ids.add(header.message_id)
            result.accepted.append(
                Announcement(
                    site=site,
                    dataset=header.dataset,
                    contract_version=body.contract_version,
                    key=key,
                    message_id=header.message_id,
                    announced_at=body.announced_at,
                )
            )
            log.info("site %s announced new staged data for %s (%s)", site, header.dataset, key)
        if keep:
            new_seen[site] = keep
    if new_seen != seen:
        _write_seen(storage, bucket, new_seen)
    return result


def announced_dataset(extras: Iterable[Mapping[str, Any] | None], known: Iterable[str]) -> str | None:
    """The dataset an announcement-triggered run trains on: from the asset events' extras (the watcher's
    ``{"from_trigger": True, "payload": {"dataset": ..., "sites": [...]}}``), the LATEST event naming a known
    dataset; ``None`` when no event names one (a scheduled or UI run: the Params decide)."""
    allowed = set(known)
    chosen: str | None = None
    for extra in extras:
        payload = (extra or {}).get("payload")
        dataset = payload.get("dataset") if isinstance(payload, Mapping) else None
        if isinstance(dataset, str) and dataset in allowed:
            chosen = dataset
        elif dataset is not None:
            log.warning("ignoring an announcement event for an unknown dataset %r", dataset)
    return chosen
