"""Stand-ins for the unit tests of the exchange (site and coordinator sides).

``MemoryStorage`` behaves like ``adapters.storage.Storage`` for the calls the exchange makes (put, get,
exists, list by prefix, remove, buckets); ``LocalSigner`` signs with an in-memory Ed25519 key in Vault's
signature format. tests/integration/test_exchange_round.py runs the same code against SeaweedFS + OpenBao.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton_tasks.adapters.signing import PublicKey, fingerprint, format_signature
from lepton_tasks.adapters.storage import ObjectInfo, StorageError


class LocalSigner:
    """An in-memory Ed25519 key that signs like ``TransitSigner`` (``vault:v1:<b64>``)."""

    def __init__(self, name: str = "local", version: int = 1) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.name, self.version = name, version
        self.public_key_b64 = base64.b64encode(self.key.public_key().public_bytes_raw()).decode()
        self.fingerprint = fingerprint(self.public_key_b64)
        self.signed = 0

    def sign(self, data: bytes) -> str:
        self.signed += 1
        return format_signature(self.version, self.key.sign(data))

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.version, self.public_key_b64)


class MemoryStorage:
    """Buckets of bytes in a dict; ``calls`` records every operation (``("put", bucket, key)`` …)."""

    endpoint = "memory:0"

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.calls: list[tuple[str, ...]] = []

    def ensure_bucket(self, bucket: str) -> bool:
        self.calls.append(("ensure_bucket", bucket))
        if bucket in self.buckets:
            return False
        self.buckets[bucket] = {}
        return True

    def remove_bucket(self, bucket: str) -> None:
        self.calls.append(("remove_bucket", bucket))
        self.buckets.pop(bucket, None)

    def _bucket(self, bucket: str) -> dict[str, bytes]:
        if bucket not in self.buckets:
            raise StorageError(f"cannot use s3://{bucket}: NoSuchBucket")
        return self.buckets[bucket]

    def put_bytes(self, bucket: str, key: str, data: bytes, **_: Any) -> str:
        self.calls.append(("put", bucket, key))
        self._bucket(bucket)[key] = bytes(data)
        return "etag"

    def get_bytes(self, bucket: str, key: str) -> bytes:
        self.calls.append(("get", bucket, key))
        try:
            return self._bucket(bucket)[key]
        except KeyError:
            raise StorageError(f"cannot read s3://{bucket}/{key}: NoSuchKey") from None

    def exists(self, bucket: str, key: str) -> bool:
        return key in self._bucket(bucket)

    def list(self, bucket: str, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        self.calls.append(("list", bucket, prefix))
        for key in sorted(self._bucket(bucket)):
            if key.startswith(prefix):
                yield ObjectInfo(bucket, key, len(self.buckets[bucket][key]), "etag", {})

    def remove(self, bucket: str, key: str) -> None:
        self.calls.append(("remove", bucket, key))
        self._bucket(bucket).pop(key, None)

    def puts(self, bucket: str | None = None) -> list[str]:
        return [c[2] for c in self.calls if c[0] == "put" and (bucket is None or c[1] == bucket)]


class RecordingIdentities:
    """A BucketIdentities backend that records grants and revocations."""

    def __init__(self) -> None:
        self.granted: dict[str, tuple[str, str, str]] = {}
        self.revoked: list[tuple[str, str]] = []

    def grant_bucket(self, user: str, access_key: str, secret_key: str, bucket: str) -> None:
        self.granted[user] = (access_key, secret_key, bucket)

    def revoke(self, user: str, access_key: str) -> None:
        self.revoked.append((user, access_key))
        self.granted.pop(user, None)


# ---------------------------------------------------------------------------------------------- builders

CONSORTIUM = "credit-risk"
RUN = "run-20260101"


def contract() -> tuple[dict[str, Any], str]:
    from lepton_tasks.core.contracts import load_contract

    c = load_contract("banks")
    return c.document(), c.sha256


def round_job(**overrides: Any) -> Any:
    """A valid train RoundJob for the ``banks`` contract."""
    from lepton_tasks.core.messages import RoundJob, TrainerHParams

    document, sha = contract()
    fields: dict[str, Any] = {
        "mode": "train",
        "dataset": "banks",
        "contract": document,
        "contract_sha256": sha,
        "strategy": "fedavg",
        "rounds": 5,
        "min_partners": 2,
        "hparams": TrainerHParams(
            local_epochs=1, local_only_epochs=1, batch_size=32, learning_rate=0.01, seed=7, fedprox_mu=0.0
        ),
    }
    fields.update(overrides)
    return RoundJob(**fields)


def site_policy(coordinator: LocalSigner, site: str, **overrides: Any) -> Any:
    from datetime import timedelta

    from lepton_tasks.core.site_policy import Approval, DatasetGrant, SitePolicy, TrustedCoordinator

    _, sha = contract()
    fields: dict[str, Any] = {
        "schema_version": 1,
        "site": site,
        "consortium": CONSORTIUM,
        "coordinator": TrustedCoordinator(
            public_key=coordinator.public_key_b64, fingerprint=coordinator.fingerprint, key_version=1
        ),
        "datasets": (DatasetGrant(name="banks", contract_sha256=sha),),
        "min_partners": 2,
        "max_rounds": 10,
        "allowed_strategies": frozenset({"fedavg", "fedprox"}),
        "require_secure_aggregation": False,
        "approval": Approval(required=False),
    }
    if overrides.pop("approval_required", False):
        fields["approval"] = Approval(required=True, deadline=timedelta(hours=2))
    fields.update(overrides)
    return SitePolicy(**fields)
