"""Ingest one drop: inbox object → validated, cleaned, split, statistics, encrypted, staged (manifest last).

This is the transaction behind the Airflow ``ingest`` task. It is keyed by the drop's content hash, so a
re-run or the same file dropped twice stages nothing new. Plaintext exists only in the task's private work
directory; shared buckets receive ciphertext and a signed manifest (aggregates only, never rows).

Object layout::

    inbox-<partner>/<dataset>/<file>                          the partner's drop (its own bucket)
    inbox-<partner>/quarantine/<dataset>/<drop_id>/...        a rejected drop: original bytes, reason.json,
                                                              validation.html — readable by that partner only
    quarantine/<partner>/<drop_id>.json                       operator index: code/file/row/column, no values
    staging/<partner>/<dataset>/<drop_id>/{train,holdout}.parquet.enc
    staging/<partner>/<dataset>/<drop_id>/manifest.json       written last: the commit marker (HMAC-signed)
    staging/_seen/<partner>/<sha256(key)>.json                inbox key+etag → drop id (cheap re-scan)
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lepton_tasks.adapters.envelope import associated_data, encrypt_file
from lepton_tasks.adapters.manifest import sign_manifest
from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage, sha256_file
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.contracts import available, load_contract
from lepton_tasks.core.drops import DropError, parse_drop_key
from lepton_tasks.core.messages import (
    Encryption,
    Manifest,
    QuarantineReason,
    RowCounts,
    SourceObject,
    StagedObject,
    dump,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
QUARANTINE_PREFIX = "quarantine/"


@dataclass
class IngestResult:
    partner: str
    object_key: str
    status: str  # staged | skipped | quarantined
    drop_id: str
    dataset: str | None = None
    manifest_key: str | None = None
    reason: dict[str, Any] | None = None
    rows: dict[str, int] = field(default_factory=dict)


def drop_id_of(sha256_hex: str) -> str:
    """A drop's id: the first 16 hex digits of the SHA-256 of its bytes (the same file, the same id)."""
    return sha256_hex[:16]


def drop_prefix(partner: str, dataset: str, drop_id: str) -> str:
    return f"{partner}/{dataset}/{drop_id}/"


def _seen_key(partner: str, object_key: str) -> str:
    return f"_seen/{partner}/{hashlib.sha256(object_key.encode()).hexdigest()}.json"


def already_ingested(
    storage: Storage, settings: Settings, partner: str, object_key: str, etag: str
) -> str | None:
    """The drop id when this exact inbox object (key + etag) was already handled, else None."""
    key = _seen_key(partner, object_key)
    if not storage.exists(settings.staging_bucket, key):
        return None
    seen = storage.get_json(settings.staging_bucket, key)
    return seen["drop_id"] if seen.get("etag") == etag else None


def inbox_objects(
    storage: Storage, settings: Settings, partners: list[str] | None = None
) -> Iterator[dict[str, str]]:
    """``{"partner", "key", "etag"}`` of every candidate drop in the inboxes of ``partners`` (default: every
    ``inbox-*`` bucket); a partner's ``quarantine/`` folder is never a drop."""
    if partners is None:
        prefix = settings.inbox_bucket_prefix
        partners = [b.name[len(prefix) :] for b in storage.client.list_buckets() if b.name.startswith(prefix)]
    for partner in partners:
        bucket = settings.inbox_bucket(partner)
        if not storage.client.bucket_exists(bucket):
            continue
        for obj in storage.list(bucket):
            if not obj.key.startswith(QUARANTINE_PREFIX):
                yield {"partner": partner, "key": obj.key, "etag": obj.etag}


def list_new_drops(storage: Storage, settings: Settings, partners: list[str]) -> list[dict[str, str]]:
    """Sweep: every inbox object of ``partners`` not yet handled."""
    return [
        d
        for d in inbox_objects(storage, settings, partners)
        if already_ingested(storage, settings, d["partner"], d["key"], d["etag"]) is None
    ]


def _quarantine(
    storage: Storage,
    settings: Settings,
    partner: str,
    object_key: str,
    drop_id: str,
    error: DropError,
    validation_html: str | None,
) -> dict[str, Any]:
    """Move the original into the partner's own quarantine folder with reason.json (+ HTML report)."""
    bucket = settings.inbox_bucket(partner)
    dataset = object_key.split("/", 1)[0] if "/" in object_key else "_root"
    safe_ds = dataset if dataset in available() else "_unknown"
    base = f"{QUARANTINE_PREFIX}{safe_ds}/{drop_id}/"
    filename = hashlib.sha256(object_key.encode()).hexdigest()[:12] + ".original"
    reason = dump(
        QuarantineReason(
            **error.to_reason(),
            partner=partner,
            object_key=object_key,
            object_keys=[object_key],
            drop_id=drop_id,
            original=f"s3://{bucket}/{base}{filename}",
            quarantined_at=datetime.now(UTC),
        )
    )
    storage.copy(bucket, object_key, bucket, base + filename)
    storage.put_json(bucket, base + "reason.json", reason)
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
            "code": error.code,
            "row": error.row,
            "column": error.column,
            "details": f"s3://{bucket}/{base}reason.json",
        },
    )
    storage.remove(bucket, object_key)  # moved, after the copy and reason exist: nothing is lost
    return reason


def ingest_drop(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    partner: str,
    object_key: str,
    *,
    work_root: Path | None = None,
    chunk_rows: int | None = None,
) -> IngestResult:
    """Process one inbox object of ``partner``. Raises :class:`DropError` after quarantining a bad drop."""
    from lepton_tasks.ingest.prepare import CHUNK_ROWS, prepare_drop

    bucket = settings.inbox_bucket(partner)
    work = Path(tempfile.mkdtemp(prefix=f"lepton-ingest-{partner}-", dir=work_root))
    try:
        info = storage.stat(bucket, object_key)
        raw = storage.download(bucket, object_key, work / "raw")
        drop_hash = sha256_file(raw)
        drop_id = drop_id_of(drop_hash)
        try:
            dk = parse_drop_key(object_key, available())
        except DropError as err:
            reason = _quarantine(storage, settings, partner, object_key, drop_id, err, None)
            log.error("drop %s of %s quarantined: %s", object_key, partner, err)
            raise DropError(
                err.code, f"{err.message} (quarantined at {reason['original']})", file=object_key, fix=err.fix
            ) from err
        contract = load_contract(dk.dataset)
        prefix = drop_prefix(partner, dk.dataset, drop_id)
        if storage.exists(settings.staging_bucket, prefix + MANIFEST):
            log.info(
                "drop %s of %s has content hash %s, already staged at s3://%s/%s: skipped",
                object_key,
                partner,
                drop_id,
                settings.staging_bucket,
                prefix,
            )
            _mark_seen(storage, settings, partner, object_key, info.etag, drop_id)
            return IngestResult(partner, object_key, "skipped", drop_id, dk.dataset, prefix + MANIFEST)
        try:
            prepared = prepare_drop(
                raw,
                contract,
                object_key=object_key,
                out_dir=work / "prepared",
                chunk_rows=CHUNK_ROWS if chunk_rows is None else chunk_rows,
            )
        except DropError as err:
            html = getattr(err, "validation_html", None)
            reason = _quarantine(storage, settings, partner, object_key, drop_id, err, html)
            log.error("drop %s of %s quarantined: %s", object_key, partner, err)
            raise
        raw.unlink()

        key_name = settings.transit_key(partner)
        key_version = int(vault.key_info(key_name)["latest_version"])
        objects = {}
        for split, path in (("train", prepared.train_path), ("holdout", prepared.holdout_path)):
            obj_key = f"{prefix}{split}.parquet.enc"
            enc = work / f"{split}.enc"
            digest = encrypt_file(
                path,
                enc,
                client=vault.client,
                key_name=key_name,
                ad=associated_data(partner, settings.staging_bucket, obj_key),
                transit_mount=settings.transit_mount,
            )
            path.unlink()
            storage.put_file(settings.staging_bucket, obj_key, enc)
            enc.unlink()
            objects[split] = {"key": obj_key, "sha256": digest}
        manifest = Manifest(
            partner=partner,
            dataset=dk.dataset,
            drop_id=drop_id,
            drop_sha256=drop_hash,
            source=SourceObject(bucket=bucket, key=object_key, etag=info.etag, size=info.size),
            contract=contract.version_tag,
            contract_sha256=contract.sha256,
            rows=RowCounts(train=prepared.rows_train, holdout=prepared.rows_holdout),
            cleaning=_dump(prepared.report),
            statistics_train=prepared.stats,
            warnings=[_dump(w) for w in prepared.warnings],
            encryption=Encryption(
                scheme="tink-streaming-aead/AES256_GCM_HKDF_1MB+vault-transit",
                key_name=key_name,
                key_version=key_version,
            ),
            objects={split: StagedObject(**obj) for split, obj in objects.items()},
            staged_at=datetime.now(UTC),  # orders re-uploads of a key
        )
        body = dump(sign_manifest(vault, key_name, manifest))
        storage.put_json(settings.staging_bucket, prefix + MANIFEST, body)  # last: the commit marker
        _mark_seen(storage, settings, partner, object_key, info.etag, drop_id)
        log.info(
            "staged drop %s of %s as s3://%s/%s (%d train / %d holdout rows)",
            object_key,
            partner,
            settings.staging_bucket,
            prefix,
            prepared.rows_train,
            prepared.rows_holdout,
        )
        return IngestResult(
            partner,
            object_key,
            "staged",
            drop_id,
            dk.dataset,
            prefix + MANIFEST,
            rows=manifest.rows.model_dump(),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dump(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return obj


def _mark_seen(
    storage: Storage, settings: Settings, partner: str, object_key: str, etag: str, drop_id: str
) -> None:
    storage.put_json(
        settings.staging_bucket,
        _seen_key(partner, object_key),
        {"partner": partner, "key": object_key, "etag": etag, "drop_id": drop_id},
    )


def staged_manifests(
    storage: Storage, settings: Settings, dataset: str, partners: list[str] | None = None
) -> dict[str, list[str]]:
    """Committed drops (those with a manifest) per partner for ``dataset``; drops without one are ignored."""
    out: dict[str, list[str]] = {}
    for obj in storage.list(settings.staging_bucket):
        parts = obj.key.split("/")
        committed = (
            len(parts) == 4 and parts[1] == dataset and parts[3] == MANIFEST and not parts[0].startswith("_")
        )
        if committed and (partners is None or parts[0] in partners):
            out.setdefault(parts[0], []).append(obj.key)
    return {p: sorted(keys) for p, keys in sorted(out.items())}
