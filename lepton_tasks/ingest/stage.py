"""Ingest one drop: inbox object → validated, cleaned, split, statistics, encrypted, staged (manifest last).

This is the transaction behind the Airflow ``ingest`` task. A drop's staging identity is its content hash
plus the SHA-256 of the contract it was validated under: the same bytes sent again (under any key) stage
nothing new while the contract is unchanged, and are validated again under a new contract (see
:func:`restage`). Plaintext exists only in the task's private work directory; shared buckets receive
ciphertext and a signed manifest (aggregates only, never rows).

Object layout::

    inbox-<partner>/<dataset>/<file>                          the partner's drop (its own bucket)
    inbox-<partner>/quarantine/<dataset>/<drop_id>/...        a rejected drop (see ingest.quarantine)
    quarantine/<partner>/<drop_id>.json                       operator index: code/file/row/column, no values
    staging/<partner>/<dataset>/<drop_id>/{train,holdout}-<nonce>.parquet.enc
    staging/<partner>/<dataset>/<drop_id>/manifest.json       written last: the commit marker (HMAC-signed)
    staging/_seen/<partner>/<sha256(key)>.json                inbox key+etag → drop id: handled, announced
    staging/_inflight/<partner>/<sha256(key)>.json            an ingest at work on that key (heartbeat)

Each attempt writes its encrypted objects under fresh names (``<nonce>``) and the manifest names them, so two
attempts racing on the same drop (a sweep and an event, a retry) can never leave a manifest pointing at the
other attempt's ciphertext; the objects of a manifest that is replaced are removed after the commit.

``_seen`` means *handled*: staged and announced for training, or a copy of bytes already staged, and it is
what the inbox trigger and the sweep use to leave a key alone. Callers that announce staged drops themselves
(the ingest DAG) pass ``mark_seen=False`` and call :func:`mark_announced` once the announcement is out; until
then a retry reports the drop ``staged`` again (without redoing the work), so a crash or a retry between the
manifest and the announcement never loses the announcement.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from lepton_tasks.adapters.envelope import associated_data, encrypt_file
from lepton_tasks.adapters.manifest import ManifestError, read_manifest, sign_manifest
from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage, sha256_file
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.contracts import Contract, available, load_contract
from lepton_tasks.core.drops import DropError, cap_list, parse_drop_key
from lepton_tasks.core.messages import (
    Encryption,
    Manifest,
    RowCounts,
    SourceObject,
    StagedObject,
    dump,
)
from lepton_tasks.ingest.quarantine import QUARANTINE_PREFIX, quarantine_drop

__all__ = [
    "MANIFEST",
    "QUARANTINE_PREFIX",
    "IngestResult",
    "already_ingested",
    "drop_state",
    "inbox_objects",
    "ingest_batch",
    "ingest_drop",
    "list_new_drops",
    "mark_announced",
    "restage",
    "staged_manifests",
    "summarize",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: an ingest renews its ``_inflight`` marker this often …
LEASE_HEARTBEAT_S = 60.0
#: … and a marker not renewed for this long belongs to an ingest that died (crash, storage outage)
LEASE_TTL_S = 300.0

#: staged: new data (announce it) · skipped: nothing new (these bytes are staged under the current contract
#: and announced) · quarantined: bad data, moved to the partner's quarantine · failed: could not finish
#: (storage or Vault down…), left in the inbox to be retried · gone: no longer in the inbox
Status = Literal["staged", "skipped", "quarantined", "failed", "gone"]


@dataclass
class IngestResult:
    """What happened to one inbox object (JSON-able with :meth:`to_dict`: the ingest task's XCom)."""

    partner: str
    object_key: str
    status: Status
    drop_id: str | None
    dataset: str | None = None
    manifest_key: str | None = None
    reason: dict[str, Any] | None = None
    rows: dict[str, int] = field(default_factory=dict)
    etag: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drop_id_of(sha256_hex: str) -> str:
    """A drop's id: the first 16 hex digits of the SHA-256 of its bytes (the same file, the same id)."""
    return sha256_hex[:16]


def drop_prefix(partner: str, dataset: str, drop_id: str) -> str:
    return f"{partner}/{dataset}/{drop_id}/"


def _key_hash(object_key: str) -> str:
    return hashlib.sha256(object_key.encode()).hexdigest()


def _seen_key(partner: str, object_key: str) -> str:
    return f"_seen/{partner}/{_key_hash(object_key)}.json"


def _lease_key(partner: str, object_key: str) -> str:
    return f"_inflight/{partner}/{_key_hash(object_key)}.json"


# ------------------------------------------------------------------------------------------ handled keys


def already_ingested(
    storage: Storage, settings: Settings, partner: str, object_key: str, etag: str
) -> str | None:
    """The drop id when this exact inbox object (key + etag) was already handled, else None."""
    key = _seen_key(partner, object_key)
    if not storage.exists(settings.staging_bucket, key):
        return None
    seen = storage.get_json(settings.staging_bucket, key)
    return seen["drop_id"] if seen.get("etag") == etag else None


def _mark_seen(
    storage: Storage, settings: Settings, partner: str, object_key: str, etag: str, drop_id: str
) -> None:
    storage.put_json(
        settings.staging_bucket,
        _seen_key(partner, object_key),
        {"partner": partner, "key": object_key, "etag": etag, "drop_id": drop_id},
    )


def mark_announced(storage: Storage, settings: Settings, results: Iterable[IngestResult | dict]) -> int:
    """Record the ``staged`` results as handled, once their announcement is out; return how many.

    The ingest DAG calls this from the task that emits the dataset's Asset event (``ingest_drop`` ran with
    ``mark_seen=False``). Until then a key stays unhandled and a retry reports it ``staged`` again.
    """
    n = 0
    for r in results:
        d = r.to_dict() if isinstance(r, IngestResult) else r
        if d.get("status") != "staged":
            continue
        if not d.get("etag") or not d.get("drop_id"):
            raise ValueError(
                f"{d.get('partner')}/{d.get('object_key')}: a staged result needs etag and drop_id"
            )
        _mark_seen(storage, settings, d["partner"], d["object_key"], d["etag"], d["drop_id"])
        storage.remove(settings.staging_bucket, _lease_key(d["partner"], d["object_key"]))
        n += 1
    return n


class _Lease:
    """``_inflight/<partner>/<sha256(key)>.json`` while an ingest works on a key, renewed every
    :data:`LEASE_HEARTBEAT_S` seconds on a background thread; marked ``ended`` when the ingest is over.

    It tells the inbox trigger and the sweep that the key is being handled (do not start it again) and, once
    it stops being renewed, that whoever held it is gone (retry it). Advisory: it never blocks an ingest.
    """

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        partner: str,
        object_key: str,
        etag: str,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
    ) -> None:
        self._storage, self._bucket = storage, settings.staging_bucket
        self._key = _lease_key(partner, object_key)
        self._body = {"partner": partner, "key": object_key, "etag": etag}
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lepton-ingest-lease")

    def _put(self, state: str) -> None:
        self._storage.put_json(
            self._bucket, self._key, {**self._body, "state": state, "heartbeat_at": time.time()}
        )

    def _run(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._put("running")
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat only makes the lease look stale
                log.warning("could not renew the ingest lease %s: %s", self._key, exc)

    def __enter__(self) -> _Lease:
        self._put("running")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._put("ended")
        except Exception as exc:  # noqa: BLE001 - storage down: the lease goes stale by itself
            log.warning("could not release the ingest lease %s: %s", self._key, exc)


def drop_state(
    storage: Storage,
    settings: Settings,
    partner: str,
    object_key: str,
    etag: str,
    *,
    now: float | None = None,
    lease_ttl: float = LEASE_TTL_S,
) -> Literal["handled", "in_progress", "pending"]:
    """Where an inbox object stands: ``handled`` (``_seen`` with this etag), ``in_progress`` (an ingest holds
    a live lease on it) or ``pending`` (neither: it needs an ingest, again if one failed)."""
    if already_ingested(storage, settings, partner, object_key, etag) is not None:
        return "handled"
    bucket, key = settings.staging_bucket, _lease_key(partner, object_key)
    if storage.exists(bucket, key):
        lease = storage.get_json(bucket, key)
        fresh = (now if now is not None else time.time()) - float(lease.get("heartbeat_at", 0)) < lease_ttl
        if lease.get("state") == "running" and lease.get("etag") == etag and fresh:
            return "in_progress"
    return "pending"


def inbox_objects(
    storage: Storage, settings: Settings, partners: list[str] | None = None
) -> Iterator[dict[str, str]]:
    """``{"partner", "key", "etag", "modified"}`` of every candidate drop in the inboxes of ``partners``
    (default: every ``inbox-*`` bucket); a partner's ``quarantine/`` folder is never a drop. ``modified``
    (ISO-8601) tells a re-upload of identical bytes (same etag) from the object already seen."""
    if partners is None:
        prefix = settings.inbox_bucket_prefix
        partners = [b.name[len(prefix) :] for b in storage.client.list_buckets() if b.name.startswith(prefix)]
    for partner in partners:
        bucket = settings.inbox_bucket(partner)
        if not storage.client.bucket_exists(bucket):
            continue
        for obj in storage.client.list_objects(bucket, recursive=True):
            key = obj.object_name or ""
            if obj.is_dir or key.startswith(QUARANTINE_PREFIX):
                continue
            modified = obj.last_modified.isoformat() if obj.last_modified else ""
            yield {"partner": partner, "key": key, "etag": str(obj.etag), "modified": modified}


def list_new_drops(storage: Storage, settings: Settings, partners: list[str]) -> list[dict[str, str]]:
    """Sweep: every inbox object of ``partners`` not yet handled and not being ingested right now."""
    return [
        d
        for d in inbox_objects(storage, settings, partners)
        if drop_state(storage, settings, d["partner"], d["key"], d["etag"]) == "pending"
    ]


# ------------------------------------------------------------------------------------------------ ingest


def _current_manifest(
    storage: Storage, settings: Settings, vault: Vault, partner: str, dataset: str, key: str
) -> Manifest | None:
    """The verified manifest at ``key`` in staging, or None when there is none or it does not verify (then
    the drop is staged again and the bad manifest replaced)."""
    if not storage.exists(settings.staging_bucket, key):
        return None
    try:
        return read_manifest(storage, settings, vault, partner, key, dataset)
    except ManifestError as exc:
        log.error("%s does not verify (%s): the drop is staged again and the manifest replaced", key, exc)
        return None


def _check_allowed(partner: str, dataset: str, allowed: Collection[str], object_key: str) -> None:
    if dataset in allowed:
        return
    onboarded = (
        f"partner {partner} is onboarded for datasets [{cap_list(sorted(allowed))}]"
        if allowed
        else f"partner {partner} is not onboarded for any dataset (not in the partner registry)"
    )
    raise DropError(
        "dataset_not_allowed",
        f"{onboarded}; this drop is for {dataset}",
        file=object_key,
        fix=f"Upload it under a dataset folder {partner} is onboarded for, or ask the operator to onboard "
        f"{partner} for {dataset}.",
        details={"dataset": dataset, "allowed": sorted(allowed)[:20]},
    )


def ingest_drop(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    partner: str,
    object_key: str,
    *,
    allowed_datasets: Collection[str] | None = None,
    mark_seen: bool = True,
    work_root: Path | None = None,
    chunk_rows: int | None = None,
) -> IngestResult:
    """Process one inbox object of ``partner``. Raises :class:`DropError` after quarantining a bad drop.

    ``allowed_datasets``: the datasets ``partner`` is onboarded for (its registry entry); a drop for another
    dataset is quarantined (``dataset_not_allowed``). ``None`` skips the check (callers that made it).
    ``mark_seen=False``: leave the key unhandled after staging; the caller calls :func:`mark_announced`
    once it has announced the drop. Any other exception (storage or Vault down…) leaves the inbox object
    where it is and nothing committed: retrying is safe.
    """
    bucket = settings.inbox_bucket(partner)
    info = storage.stat(bucket, object_key)
    with _Lease(storage, settings, partner, object_key, info.etag):
        return _ingest(
            settings,
            storage,
            vault,
            partner,
            object_key,
            etag=info.etag,
            size=info.size,
            allowed_datasets=allowed_datasets,
            mark_seen=mark_seen,
            work_root=work_root,
            chunk_rows=chunk_rows,
        )


def _ingest(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    partner: str,
    object_key: str,
    *,
    etag: str,
    size: int,
    allowed_datasets: Collection[str] | None,
    mark_seen: bool,
    work_root: Path | None,
    chunk_rows: int | None,
) -> IngestResult:
    from lepton_tasks.ingest.prepare import CHUNK_ROWS, prepare_drop

    bucket = settings.inbox_bucket(partner)
    work = Path(tempfile.mkdtemp(prefix=f"lepton-ingest-{partner}-", dir=work_root))
    try:
        raw = storage.download(bucket, object_key, work / "raw")
        drop_hash = sha256_file(raw)
        drop_id = drop_id_of(drop_hash)
        try:
            dk = parse_drop_key(object_key, available())
            if allowed_datasets is not None:
                _check_allowed(partner, dk.dataset, allowed_datasets, object_key)
        except DropError as err:
            reason = quarantine_drop(storage, settings, partner, object_key, drop_id, err, None)
            log.error("drop %s of %s quarantined: %s", object_key, partner, err)
            raise DropError(
                err.code,
                f"{err.message} (quarantined at {reason['original']})",
                file=object_key,
                fix=err.fix,
                details=err.details,
            ) from err
        contract = load_contract(dk.dataset)
        prefix = drop_prefix(partner, dk.dataset, drop_id)
        manifest_key = prefix + MANIFEST
        existing = _current_manifest(storage, settings, vault, partner, dk.dataset, manifest_key)
        if existing is not None and existing.contract_sha256 == contract.sha256:
            return _already_staged(
                storage, settings, partner, object_key, etag, existing, manifest_key, mark_seen=mark_seen
            )
        if existing is not None:
            log.info(
                "drop %s of %s (%s) was staged under %s (%s…); validating it again under %s (%s…)",
                object_key,
                partner,
                drop_id,
                existing.contract,
                existing.contract_sha256[:12],
                contract.version_tag,
                contract.sha256[:12],
            )
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
            quarantine_drop(storage, settings, partner, object_key, drop_id, err, html)
            log.error("drop %s of %s quarantined: %s", object_key, partner, err)
            raise
        raw.unlink()
        manifest = _encrypt_and_commit(
            settings,
            storage,
            vault,
            partner,
            prefix,
            prepared,
            contract,
            drop_id=drop_id,
            drop_hash=drop_hash,
            source=SourceObject(bucket=bucket, key=object_key, etag=etag, size=size),
            work=work,
        )
        if existing is not None:
            _remove_replaced_objects(storage, settings, existing, manifest)
        if mark_seen:
            _mark_seen(storage, settings, partner, object_key, etag, drop_id)
        log.info(
            "staged drop %s of %s as s3://%s/%s under %s (%d train / %d holdout rows)",
            object_key,
            partner,
            settings.staging_bucket,
            prefix,
            contract.version_tag,
            prepared.rows_train,
            prepared.rows_holdout,
        )
        return IngestResult(
            partner,
            object_key,
            "staged",
            drop_id,
            dk.dataset,
            manifest_key,
            rows=manifest.rows.model_dump(),
            etag=etag,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _already_staged(
    storage: Storage,
    settings: Settings,
    partner: str,
    object_key: str,
    etag: str,
    existing: Manifest,
    manifest_key: str,
    *,
    mark_seen: bool,
) -> IngestResult:
    """These bytes are staged under the current contract. From this very key but never marked handled
    (a crash or a retry after the commit, or the announcement still due): ``staged`` again, so it is
    announced. Otherwise (announced already, or a copy under another key): ``skipped``, and handled."""
    from_here = existing.source.key == object_key
    unannounced = from_here and already_ingested(storage, settings, partner, object_key, etag) is None
    if not unannounced or mark_seen:
        _mark_seen(storage, settings, partner, object_key, etag, existing.drop_id)
    if unannounced:
        log.info(
            "drop %s of %s is staged (s3://%s/%s) but was never announced: reporting it as staged",
            object_key,
            partner,
            settings.staging_bucket,
            manifest_key,
        )
        status: Status = "staged"
    else:
        log.info(
            "drop %s of %s has content hash %s, already staged under %s at s3://%s/%s: skipped",
            object_key,
            partner,
            existing.drop_id,
            existing.contract,
            settings.staging_bucket,
            manifest_key,
        )
        status = "skipped"
    return IngestResult(
        partner,
        object_key,
        status,
        existing.drop_id,
        existing.dataset,
        manifest_key,
        rows=existing.rows.model_dump() if status == "staged" else {},
        etag=etag,
    )


def _encrypt_and_commit(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    partner: str,
    prefix: str,
    prepared: Any,
    contract: Contract,
    *,
    drop_id: str,
    drop_hash: str,
    source: SourceObject,
    work: Path,
) -> Manifest:
    """Encrypt both splits under fresh object names, upload them, then the signed manifest (the commit)."""
    key_name = settings.transit_key(partner)
    key_version = int(vault.key_info(key_name)["latest_version"])
    nonce = secrets.token_hex(4)  # this attempt's object names: a concurrent attempt never overwrites them
    objects: dict[Literal["train", "holdout"], StagedObject] = {}
    splits: tuple[tuple[Literal["train", "holdout"], Path], ...] = (
        ("train", prepared.train_path),
        ("holdout", prepared.holdout_path),
    )
    for split, path in splits:
        obj_key = f"{prefix}{split}-{nonce}.parquet.enc"
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
        objects[split] = StagedObject(key=obj_key, sha256=digest)
    manifest = Manifest(
        partner=partner,
        dataset=contract.name,
        drop_id=drop_id,
        drop_sha256=drop_hash,
        source=source,
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
        objects=objects,
        staged_at=datetime.now(UTC),  # orders re-uploads of a key
    )
    body = dump(sign_manifest(vault, key_name, manifest))
    storage.put_json(settings.staging_bucket, prefix + MANIFEST, body)  # last: the commit marker
    return manifest


def _remove_replaced_objects(storage: Storage, settings: Settings, old: Manifest, new: Manifest) -> None:
    keep = {o.key for o in new.objects.values()}
    for obj in old.objects.values():
        if obj.key in keep:
            continue
        try:
            storage.remove(settings.staging_bucket, obj.key)
        except Exception as exc:  # noqa: BLE001 - the drop is committed; an orphan object is only clutter
            log.warning(
                "could not remove the replaced object s3://%s/%s: %s", settings.staging_bucket, obj.key, exc
            )


def _dump(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj


# ----------------------------------------------------------------------------------------------- batches


def _result_reason(err: DropError) -> dict[str, Any]:
    """What a result (an XCom in Airflow's database) says about a quarantined drop: where and what kind of
    failure and how to fix it; the failing rows' values stay in the partner's own ``reason.json``."""
    return {"code": err.code, "file": err.file, "row": err.row, "column": err.column, "fix": err.fix}


def ingest_batch(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    drops: Sequence[Mapping[str, str]],
    *,
    allowed: Mapping[str, Collection[str]] | None = None,
    mark_seen: bool = True,
    work_root: Path | None = None,
) -> list[IngestResult]:
    """Ingest ``drops`` (``{"partner", "key"}``) one after the other; one result per drop, in order.

    One drop's failure never stops the others: bad data is quarantined (``quarantined``, with its reason),
    anything else (storage or Vault down…) is ``failed`` with the error and leaves the drop in the inbox,
    unhandled, for a retry. ``allowed``: partner → the datasets it is onboarded for (a partner missing from
    it may feed none); ``None`` skips that check.
    """
    results: list[IngestResult] = []
    for d in drops:
        partner, key = d["partner"], d["key"]
        try:
            if not storage.exists(settings.inbox_bucket(partner), key):
                log.info("%s/%s is no longer in the inbox (already handled): nothing to do", partner, key)
                results.append(IngestResult(partner, key, "gone", None))
                continue
            results.append(
                ingest_drop(
                    settings,
                    storage,
                    vault,
                    partner,
                    key,
                    allowed_datasets=None if allowed is None else allowed.get(partner, ()),
                    mark_seen=mark_seen,
                    work_root=work_root,
                )
            )
        except DropError as err:
            results.append(
                IngestResult(partner, key, "quarantined", None, reason=_result_reason(err), error=str(err))
            )
        except Exception as exc:  # reported as `failed`; the caller fails the task after the batch
            log.exception("ingest of %s/%s failed; it stays in the inbox for a retry", partner, key)
            results.append(IngestResult(partner, key, "failed", None, error=f"{type(exc).__name__}: {exc}"))
    return results


def summarize(
    drops: Sequence[Mapping[str, str]], results: Iterable[Mapping[str, Any]]
) -> tuple[str, list[str]]:
    """A run's report: ``(text, problems)``. ``problems`` names every drop that was quarantined, failed, or
    has no result at all (its task died before reporting), with the reason; empty when all went well."""
    by_key = {(r["partner"], r["object_key"]): r for r in results}
    counts: dict[str, int] = {}
    problems: list[str] = []
    for d in drops:
        r = by_key.get((d["partner"], d["key"]))
        status = r["status"] if r else "no result"
        counts[status] = counts.get(status, 0) + 1
        where = f"{d['partner']}/{d['key']}"
        if r is None:
            problems.append(f"{where}: no result (its ingest task failed before reporting: see its log)")
        elif status in ("quarantined", "failed"):
            problems.append(f"{where}: {status}: {r.get('error') or '(no message)'}")
    head = f"{len(drops)} drop(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join([head, *problems]), problems


# ----------------------------------------------------------------------------------------------- restage


def restage(
    settings: Settings,
    storage: Storage,
    vault: Vault,
    dataset: str,
    *,
    partners: list[str] | None = None,
    allowed: Mapping[str, Collection[str]] | None = None,
) -> list[IngestResult]:
    """Validate again, under ``dataset``'s current contract, every staged drop staged under another one.

    **What a contract version bump means.** A drop is staged *under a contract*: its manifest records the
    contract's version tag and SHA-256, and training uses only drops staged under the exact contract of the
    run (``plan_run`` excludes the others, naming this command). Changing a contract (a new version, or any
    edit to its rules: the hash leaves out descriptions and the ``training`` defaults) therefore leaves every
    drop staged before it out of training until it is validated again, because the new rules may reject data
    the old ones accepted. The same bytes sent again are validated again (a drop's staging identity is its
    content hash *and* the contract's hash); this function does it for every such drop whose original is still
    in the partner's inbox, unchanged (same key, same etag), as ``lepton contracts restage --dataset D`` does.

    Per drop, one result: ``staged`` (re-validated; the new manifest replaces the old one, whose objects are
    removed), ``quarantined`` (it fails the new contract: the original moves to the partner's quarantine with
    the reason; the old staged copy stays excluded from training), ``failed`` (its manifest does not verify,
    or a service failed: ``error`` says which) or ``gone`` (the original is no longer in the inbox, or was
    overwritten: the partner must send it again). Drops already under the current contract are not listed.
    Nothing is announced: start a training run when it is done. Safe to run again.
    """
    contract = load_contract(dataset)
    results: list[IngestResult] = []
    for partner, keys in staged_manifests(storage, settings, dataset, partners).items():
        for key in keys:
            try:
                m = read_manifest(storage, settings, vault, partner, key, dataset)
            except ManifestError as exc:
                results.append(IngestResult(partner, "", "failed", None, dataset, key, error=str(exc)))
                continue
            if m.contract_sha256 == contract.sha256:
                continue
            src = m.source
            if not storage.exists(src.bucket, src.key) or storage.stat(src.bucket, src.key).etag != src.etag:
                results.append(
                    IngestResult(
                        partner,
                        src.key,
                        "gone",
                        m.drop_id,
                        dataset,
                        key,
                        error=f"the original s3://{src.bucket}/{src.key} is no longer in the inbox as it was "
                        f"staged: {partner} must send it again",
                    )
                )
                continue
            try:
                results.append(
                    ingest_drop(
                        settings,
                        storage,
                        vault,
                        partner,
                        src.key,
                        allowed_datasets=None if allowed is None else allowed.get(partner, ()),
                    )
                )
            except DropError as err:
                results.append(
                    IngestResult(
                        partner,
                        src.key,
                        "quarantined",
                        m.drop_id,
                        dataset,
                        reason=_result_reason(err),
                        error=str(err),
                    )
                )
    return results


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
