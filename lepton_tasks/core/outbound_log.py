"""The site's append-only log of everything it writes to the coordinator's exchange bucket.

A partner must be able to show what left its site. Every object the site puts into its exchange bucket gets
one :class:`OutboundRecord` (kind, bucket, object key, size, SHA-256, run, round, message id, time) in a JSON
lines file that only the site's own user can read (mode 0600), appended with ``O_APPEND`` under an exclusive
``flock`` and ``fsync``-ed, one canonical JSON object per line.

Write-ahead convention: append the record **before** the put. Then the log lists everything the site may
have sent, never less: a crash or a failed put leaves a record whose object is missing (harmless, visible),
never an object without a record.

:func:`reconcile` compares the log with a listing of the bucket (the site-written prefixes only) and returns
a :class:`ReconcileDiff`: objects in the bucket that the log does not list (``unlogged`` — the alarm: someone
wrote as the site, or the site wrote without logging), logged objects that are absent (``missing``: a failed
put, or the coordinator cleaned up), objects whose size or hash differ from what was logged (``mismatched``),
and keys logged twice with different content (``overwritten``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import UUID4, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton_tasks.core.exchange import (
    RUN_ID_PATTERN,
    SHA256_PATTERN,
    SITE_WRITTEN_PREFIXES,
    MessageKind,
    canonical_json,
    sha256_hex,
)

__all__ = [
    "ListedObject",
    "Mismatch",
    "OutboundLog",
    "OutboundLogError",
    "OutboundRecord",
    "ReconcileDiff",
    "read_log",
    "reconcile",
]

LOG_MODE: Final = 0o600


class OutboundLogError(RuntimeError):
    """The log cannot be read or appended safely; names the file (and line)."""


class OutboundRecord(BaseModel):
    """One object the site wrote (or was about to write) into its exchange bucket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    kind: MessageKind
    bucket: str = Field(min_length=3)
    object_key: str = Field(min_length=1)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    round: int = Field(ge=0)
    message_id: UUID4 | None = None
    written_at: AwareDatetime

    @field_validator("written_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @classmethod
    def for_object(
        cls,
        *,
        kind: MessageKind,
        bucket: str,
        object_key: str,
        data: bytes,
        run_id: str,
        round: int,
        message_id: uuid.UUID | None = None,
        now: datetime | None = None,
    ) -> OutboundRecord:
        """The record for putting ``data`` at ``bucket``/``object_key`` (size and hash computed here)."""
        return cls.model_validate(
            {
                "kind": kind,
                "bucket": bucket,
                "object_key": object_key,
                "size": len(data),
                "sha256": sha256_hex(data),
                "run_id": run_id,
                "round": round,
                "message_id": message_id,
                "written_at": now or datetime.now(UTC),
            }
        )

    def line(self) -> bytes:
        """The record as one canonical JSON line."""
        return canonical_json(self.model_dump(mode="json")) + b"\n"


class OutboundLog:
    """The log file at ``path`` (created on the first append, mode 0600, in a 0700 directory if new)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"OutboundLog({str(self.path)!r})"

    def append(self, record: OutboundRecord) -> None:
        """Append ``record`` durably. Refuses a log that others may read or write, a symlink, and a log whose
        last line is incomplete (a torn write needs a human: an audit log is never repaired silently)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, LOG_MODE)
        except OSError as exc:
            raise OutboundLogError(f"{self.path}: cannot open the outbound log ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutboundLogError(f"{self.path}: the outbound log is not a regular file")
            if st.st_mode & 0o077:
                raise OutboundLogError(
                    f"{self.path}: the outbound log has mode {st.st_mode & 0o777:o}; it must be 600"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                raise OutboundLogError(f"{self.path}: the last line of the outbound log is incomplete")
            data = memoryview(record.line())
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def records(self) -> list[OutboundRecord]:
        return read_log(self.path)


def read_log(path: Path) -> list[OutboundRecord]:
    """Every record of the log at ``path`` (``[]`` when there is none yet), strictly: a line that is not a
    valid record raises :class:`OutboundLogError` with its line number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    if raw and not raw.endswith(b"\n"):
        raise OutboundLogError(f"{path}: the last line of the outbound log is incomplete")
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            out.append(OutboundRecord.model_validate_json(line))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(line)"
            raise OutboundLogError(
                f"{path}:{number}: not an outbound record (field {where}: {err['msg']})"
            ) from None
    return out


# ----------------------------------------------------------------------------------------------------
# reconciliation
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedObject:
    """One object of the bucket listing: its key, size and (when the caller read it) SHA-256."""

    key: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Mismatch:
    key: str
    field: Literal["size", "sha256"]
    logged: str
    listed: str


@dataclass(frozen=True)
class ReconcileDiff:
    #: in the bucket, not in the log: something the site did not (admit to) write
    unlogged: tuple[str, ...] = ()
    #: in the log, not in the bucket: a put that failed, or an object the coordinator removed
    missing: tuple[str, ...] = ()
    #: in both, but the size or hash differs from what the site logged
    mismatched: tuple[Mismatch, ...] = ()
    #: logged more than once with different content
    overwritten: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The log lists exactly what is in the bucket."""
        return not (self.unlogged or self.missing or self.mismatched or self.overwritten)

    def summary(self) -> str:
        if self.ok:
            return "the outbound log matches the bucket"
        parts = []
        for name in ("unlogged", "missing", "mismatched", "overwritten"):
            items: tuple[object, ...] = getattr(self, name)
            if items:
                parts.append(f"{len(items)} {name}")
        return ", ".join(parts)


def reconcile(
    log_records: Iterable[OutboundRecord],
    bucket_listing: Iterable[ListedObject],
    *,
    bucket: str | None = None,
    prefixes: Sequence[str] = SITE_WRITTEN_PREFIXES,
) -> ReconcileDiff:
    """Compare the log with the bucket listing, under the site-written ``prefixes`` only (jobs are the
    coordinator's). With ``bucket``, records of other buckets are ignored. Pure: no I/O."""

    def ours(key: str) -> bool:
        return key.startswith(tuple(prefixes))

    logged: dict[str, OutboundRecord] = {}
    overwritten: set[str] = set()
    for rec in log_records:
        if (bucket is not None and rec.bucket != bucket) or not ours(rec.object_key):
            continue
        prev = logged.get(rec.object_key)
        if prev is not None and (prev.sha256, prev.size) != (rec.sha256, rec.size):
            overwritten.add(rec.object_key)
        logged[rec.object_key] = rec  # the latest write is what the bucket should hold
    listed: dict[str, ListedObject] = {}
    for obj in bucket_listing:
        if ours(obj.key):
            listed[obj.key] = obj
    mismatched: list[Mismatch] = []
    for key in sorted(logged.keys() & listed.keys()):
        rec, obj = logged[key], listed[key]
        if rec.size != obj.size:
            mismatched.append(Mismatch(key, "size", str(rec.size), str(obj.size)))
        elif obj.sha256 is not None and obj.sha256 != rec.sha256:
            mismatched.append(Mismatch(key, "sha256", rec.sha256, obj.sha256))
    return ReconcileDiff(
        unlogged=tuple(sorted(listed.keys() - logged.keys())),
        missing=tuple(sorted(logged.keys() - listed.keys())),
        mismatched=tuple(mismatched),
        overwritten=tuple(sorted(overwritten)),
    )
