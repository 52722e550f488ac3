"""Site side of announcements: tell the coordinator that ingest staged new data for a dataset.

Called by the ingest DAG's ``announce_<dataset>`` task once the run staged new data for the dataset.
A site that is not enrolled (no bundle at ``SiteFiles.bundle``) skips: :func:`announce_staged` returns
``None`` and logs why. An enrolled site signs a :class:`~lepton_tasks.core.messages.StagedAnnouncement`
with its own key (its Vault's transit engine), logs it in its outbound log (write-ahead, as every object the
site sends) and puts it at ``announcements/<dataset>/<id>.json`` in its exchange bucket with the bucket-scoped
credentials of its bundle. A storage error surfaces (the task retries); the announcement says only which
dataset, under which contract, and when.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lepton_tasks.core.announcements import AnnouncementHeader, make_announcement
from lepton_tasks.core.exchange import MessageKind
from lepton_tasks.core.outbound_log import OutboundLog, OutboundRecord

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.core.signatures import Signer

__all__ = ["Announced", "announce_staged", "write_announcement"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Announced:
    """What was written: the object key in the site's exchange bucket and the signed header."""

    bucket: str
    key: str
    header: AnnouncementHeader


def write_announcement(
    storage: Storage,
    bucket: str,
    *,
    consortium: str,
    site: str,
    dataset: str,
    signer: Signer,
    outbound_log: OutboundLog,
    now: datetime | None = None,
) -> Announced:
    """Sign and put ONE announcement of ``dataset`` into ``bucket``, logged in ``outbound_log`` first.

    In the outbound log an announcement is recorded with ``run_id`` = the dataset and round 0 (it belongs
    to no run)."""
    from lepton_tasks.core.contracts import load_contract

    now = (now or datetime.now(UTC)).astimezone(UTC)
    contract = load_contract(dataset)
    key, raw, header = make_announcement(
        consortium=consortium,
        site=site,
        bucket=bucket,
        dataset=dataset,
        contract_version=contract.version_tag,
        contract_sha256=contract.sha256,
        signer=signer,
        now=now,
    )
    outbound_log.append(
        OutboundRecord.for_object(
            kind=MessageKind.ANNOUNCEMENT,
            bucket=bucket,
            object_key=key,
            data=raw,
            run_id=dataset,
            round=0,
            message_id=header.message_id,
            now=now,
        )
    )
    storage.put_bytes(bucket, key, raw, content_type="application/json")
    log.info("announced new staged data for %s to the coordinator: %s/%s", dataset, bucket, key)
    return Announced(bucket, key, header)


def announce_staged(settings: Settings, vault: Callable[[], Vault], dataset: str) -> Announced | None:
    """Announce ``dataset``'s new staged data from this site; ``None`` (logged) when not enrolled.
    ``vault`` connects to the site's Vault (called only when the site is enrolled)."""
    from lepton_tasks.adapters.signing import TransitSigner
    from lepton_tasks.federation.enrollment import read_bundle
    from lepton_tasks.site.enrollment import SiteFiles, default_key_name, exchange_storage

    files = SiteFiles(settings.site_dir)
    if not files.bundle.exists():
        log.info("no enrollment bundle at %s: not announcing %s to a coordinator", files.bundle, dataset)
        return None
    bundle = read_bundle(files.bundle)
    return write_announcement(
        exchange_storage(bundle),
        bundle.bucket,
        consortium=bundle.consortium,
        site=bundle.site,
        dataset=dataset,
        signer=TransitSigner.from_vault(vault(), settings.site_key_name or default_key_name(bundle.site)),
        outbound_log=OutboundLog(files.outbound_log),
    )
