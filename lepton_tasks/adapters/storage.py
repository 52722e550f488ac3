"""The one S3 wrapper (``minio`` SDK): buckets, streaming put/get, atomic local downloads, presigned URLs.

Works against SeaweedFS (embedded, tests) and MinIO (compose). Retries of idempotent requests are the
SDK's own (urllib3 ``Retry`` in the minio client); multipart upload is the SDK's ``fput_object``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import DictType

from lepton_tasks.adapters.health import ServiceHealth, connection_problem
from lepton_tasks.adapters.settings import Settings

PART_SIZE = 16 * 1024 * 1024
#: seconds the health probe waits to connect and for an answer
PROBE_TIMEOUT = 5.0


def _s3_metadata(metadata: dict[str, str] | None) -> DictType | None:
    """``metadata`` as the SDK's (invariant) header-dict type."""
    return None if metadata is None else dict(metadata)


class StorageError(RuntimeError):
    """An S3 operation failed; the message names bucket and key."""


class StorageUnavailable(StorageError):
    """The S3 server did not answer (refused, reset, timed out after the SDK's retries): transient; retry.

    Replaces urllib3's ``MaxRetryError … Connection refused`` tracebacks with one line naming the service,
    the operation, the bucket and the key.
    """


_F = TypeVar("_F", bound=Callable[..., Any])


def _names_the_object(op: str) -> Callable[[_F], _F]:
    """Turn a connection failure inside ``op`` into a :class:`StorageUnavailable` naming bucket and key."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(self: Storage, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except urllib3.exceptions.HTTPError as exc:
                raise self._unavailable(op, *args[:2]) from exc

        return wrapper  # type: ignore[return-value]

    return deco


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str
    metadata: dict[str, str]


class Storage:
    """A thin, typed facade over :class:`minio.Minio`."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
    ) -> None:
        self.endpoint = endpoint
        self.access_key = access_key
        self.secure = secure
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        # the health probe's own client: one try, short timeouts (the main client retries for ~6 s)
        self._probe = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=PROBE_TIMEOUT, read=PROBE_TIMEOUT), retries=False
            ),
        )

    def health(self, bucket: str) -> ServiceHealth:
        """Probe S3 with one cheap request (HEAD ``bucket``, no retries, :data:`PROBE_TIMEOUT` s).

        Ok when the server answers, even with an S3 error (access denied, no such bucket: the service is up;
        the task itself will say what is wrong). Not ok when it does not answer or answers HTTP 5xx.
        """
        url = f"{'https' if self.secure else 'http'}://{self.endpoint}"
        try:
            self._probe.bucket_exists(bucket)
        except S3Error:
            return ServiceHealth("S3", url, True)
        except ServerError as exc:
            return ServiceHealth("S3", url, False, f"answered HTTP {exc.status_code}")
        except InvalidResponseError as exc:
            found = re.search(r"Response code: (\d+)", str(exc))
            return ServiceHealth(
                "S3", url, False, f"answered HTTP {found.group(1) if found else '?'} (not S3)"
            )
        except urllib3.exceptions.HTTPError as exc:
            return ServiceHealth("S3", url, False, connection_problem(exc, PROBE_TIMEOUT))
        return ServiceHealth("S3", url, True)

    def _unavailable(self, op: str, bucket: Any = "", key: Any = "") -> StorageUnavailable:
        where = f"s3://{bucket}/{key}" if isinstance(key, str) and key else f"s3://{bucket}"
        return StorageUnavailable(f"S3 at {self.endpoint} did not answer while trying to {op} {where}")

    def __repr__(self) -> str:  # never show the secret
        return f"Storage(endpoint={self.endpoint!r}, access_key={self.access_key!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        return cls(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    # buckets -------------------------------------------------------------------------------------------
    @_names_the_object("create")
    def ensure_bucket(self, bucket: str) -> bool:
        """Create ``bucket`` if missing; return True when it was created."""
        if self.client.bucket_exists(bucket):
            return False
        try:
            self.client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise StorageError(f"cannot create bucket {bucket}: {exc.code} {exc.message}") from exc
        return True

    def remove_bucket(self, bucket: str) -> None:
        """Delete every object of ``bucket`` and then the bucket."""
        if not self.client.bucket_exists(bucket):
            return
        for obj in self.client.list_objects(bucket, recursive=True):
            self.client.remove_object(bucket, obj.object_name)
        self.client.remove_bucket(bucket)

    # objects ---------------------------------------------------------------------------------------------
    @_names_the_object("write")
    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        res = self.client.put_object(
            bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata=_s3_metadata(metadata),
        )
        return res.etag or ""

    def put_json(self, bucket: str, key: str, obj: Any) -> str:
        return self.put_bytes(
            bucket,
            key,
            json.dumps(obj, indent=2, sort_keys=True, default=str).encode(),
            content_type="application/json",
        )

    @_names_the_object("write")
    def put_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Upload a local file (multipart for large files, done by the SDK)."""
        res = self.client.fput_object(
            bucket,
            key,
            str(path),
            content_type=content_type,
            metadata=_s3_metadata(metadata),
            part_size=PART_SIZE,
        )
        return res.etag or ""

    @_names_the_object("read")
    def get_bytes(self, bucket: str, key: str) -> bytes:
        try:
            resp = self.client.get_object(bucket, key)
        except S3Error as exc:
            raise StorageError(f"cannot read s3://{bucket}/{key}: {exc.code}") from exc
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    @_names_the_object("download")
    def download(self, bucket: str, key: str, dest: Path) -> Path:
        """Stream an object to ``dest`` atomically (a temp file renamed on success)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        os.close(fd)
        try:
            try:
                self.client.fget_object(bucket, key, tmp)
            except S3Error as exc:
                raise StorageError(f"cannot download s3://{bucket}/{key}: {exc.code}") from exc
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    @_names_the_object("look up")
    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"):
                return False
            raise
        return True

    @_names_the_object("stat")
    def stat(self, bucket: str, key: str) -> ObjectInfo:
        st = self.client.stat_object(bucket, key)
        meta = {
            k.lower().removeprefix("x-amz-meta-"): v
            for k, v in (st.metadata or {}).items()
            if k.lower().startswith("x-amz-meta-")
        }
        return ObjectInfo(bucket, key, int(st.size or 0), str(st.etag), meta)

    def list(self, bucket: str, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        try:
            for obj in self.client.list_objects(bucket, prefix=prefix or None, recursive=recursive):
                if obj.is_dir:
                    continue
                yield ObjectInfo(bucket, obj.object_name or "", int(obj.size or 0), str(obj.etag), {})
        except urllib3.exceptions.HTTPError as exc:
            raise self._unavailable("list", bucket, prefix) from exc

    @_names_the_object("copy")
    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
        """Server-side copy, multipart for large objects (SDK ``compose_object`` would also work)."""
        from minio.commonconfig import CopySource

        self.client.copy_object(dst_bucket, dst_key, CopySource(src_bucket, src_key))

    @_names_the_object("remove")
    def remove(self, bucket: str, key: str) -> None:
        self.client.remove_object(bucket, key)

    def presigned_get(self, bucket: str, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return self.client.presigned_get_object(bucket, key, expires=expires)

    def presigned_put(self, bucket: str, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return self.client.presigned_put_object(bucket, key, expires=expires)
