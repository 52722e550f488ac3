"""A storage outage is one line naming the service, the operation, the bucket and the key."""

from __future__ import annotations

import socket

import pytest

from lepton_tasks.adapters.storage import Storage, StorageError, StorageUnavailable


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_refused_connection_names_service_operation_bucket_and_key(closed_port):
    storage = Storage(f"127.0.0.1:{closed_port}", "ak", "sk")
    with pytest.raises(StorageUnavailable, match=rf"^S3 at 127\.0\.0\.1:{closed_port} did not answer") as err:
        storage.get_bytes("staging", "acme/banks/x/manifest.json")
    assert "read s3://staging/acme/banks/x/manifest.json" in str(err.value)
    assert isinstance(err.value, StorageError)
    with pytest.raises(StorageUnavailable, match="list s3://inbox-acme/banks/"):
        list(storage.list("inbox-acme", "banks/"))
