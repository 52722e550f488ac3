"""Waiting for an identity change to apply: a new or revoked SeaweedFS identity takes a moment to be live."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from minio.error import S3Error

from lepton_tasks.adapters.storage import StorageError

T = TypeVar("T")

#: what S3 answers while a new identity is not live yet
ACCESS_ERRORS = ("InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch")


def is_access_error(exc: BaseException) -> bool:
    return (isinstance(exc, S3Error) and exc.code in ACCESS_ERRORS) or (
        isinstance(exc, StorageError | S3Error) and any(code in str(exc) for code in ACCESS_ERRORS)
    )


def wait_live(fn: Callable[[], T], seconds: float = 20.0) -> T:
    """``fn()``, retried while it fails with an access error, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except (S3Error, StorageError) as exc:
            if not is_access_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def wait_until(check: Callable[[], Any], seconds: float = 20.0) -> None:
    """Poll ``check()`` until it is true; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the identity change did not apply in time"
        time.sleep(0.25)
