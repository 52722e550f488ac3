"""Sign and verify staged drop manifests: the one manifest check, used by ``plan`` and by the trainer.

A manifest is signed with an HMAC under the partner's own transit key (so only a holder of that partner's
policy — its ingest, or a trainer token scoped to it — can sign or verify). Verification checks, in order:
the object is a :class:`SignedManifest`, the HMAC verifies with the expected partner's key, and the manifest
names the expected partner and dataset and sits under that partner's prefix. Any failure is a
:class:`ManifestError`: a security failure, never retried.
"""

from __future__ import annotations

import json
from typing import Any

import hvac.exceptions

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault
from lepton_tasks.core.messages import Manifest, MessageError, SignedManifest, dump, load


class ManifestError(RuntimeError):
    """A staged manifest is not a signed Lepton manifest, or does not verify for this partner and dataset."""


def canonical(obj: Any) -> bytes:
    """The bytes an HMAC covers: JSON with sorted keys and no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign_manifest(vault: Vault, key_name: str, manifest: Manifest) -> SignedManifest:
    """The manifest with its HMAC under ``key_name`` (the partner's transit key)."""
    return SignedManifest(manifest=manifest, hmac=vault.sign(key_name, canonical(dump(manifest))))


def verify_manifest(
    vault: Vault, key_name: str, raw: bytes | dict[str, Any], *, where: str, partner: str, dataset: str | None
) -> Manifest:
    """The verified manifest read from ``where``; :class:`ManifestError` naming ``where`` otherwise.

    ``dataset=None`` accepts any dataset (the manifest is still bound to ``partner``).
    """
    try:
        signed = load(SignedManifest, raw, where=where)
    except MessageError as exc:
        raise ManifestError(f"not a signed Lepton manifest: {exc}") from None
    manifest = signed.manifest
    try:
        valid = vault.verify(key_name, canonical(dump(manifest)), signed.hmac)
    except hvac.exceptions.Forbidden:
        raise ManifestError(
            f"{where}: Vault denied verification with {key_name}: this token is not {partner}'s"
        ) from None
    if not valid:
        raise ManifestError(
            f"{where}: manifest signature does not verify with {key_name} (tampered, or not {partner}'s)"
        )
    if manifest.partner != partner or (dataset is not None and manifest.dataset != dataset):
        raise ManifestError(
            f"{where}: manifest is for {manifest.partner}/{manifest.dataset}, not {partner}/{dataset or '*'}"
        )
    for split, obj in manifest.objects.items():
        if not obj.key.startswith(f"{partner}/{manifest.dataset}/{manifest.drop_id}/"):
            raise ManifestError(f"{where}: the {split} object {obj.key} is outside this drop's prefix")
    return manifest


def read_manifest(
    storage: Storage, settings: Settings, vault: Vault, partner: str, key: str, dataset: str | None = None
) -> Manifest:
    """Read ``key`` from staging and verify it as ``partner``'s manifest (:class:`ManifestError` if not)."""
    return verify_manifest(
        vault,
        settings.transit_key(partner),
        storage.get_bytes(settings.staging_bucket, key),
        where=f"s3://{settings.staging_bucket}/{key}",
        partner=partner,
        dataset=dataset,
    )
