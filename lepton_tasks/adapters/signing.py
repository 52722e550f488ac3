"""Ed25519 signatures from a Vault transit key, verified offline with ``cryptography``.

Who holds what (DESIGN.md, "coordinator + sites"):

- the *signer* (the coordinator for jobs, a site for its answers) has a non-exportable ``ed25519`` transit key
  in its OWN Vault and a token whose policy (:func:`signer_policy`) can sign with that one key and read its
  public half — nothing else;
- a *verifier* holds only the signer's public key (base64, as Vault's ``read_key`` returns it), pinned at
  enrollment and compared by a human through its :func:`fingerprint`. :func:`verify` needs no Vault at all.

Signatures travel in Vault's own format, ``vault:v<version>:<base64 of the 64-byte Ed25519 signature>``;
:func:`parse_signature` accepts nothing else (no whitespace, no URL-safe alphabet, no missing padding).
Vault's ed25519 keys sign the raw input (pure Ed25519, no pre-hash), so ``Ed25519PublicKey.verify(signature,
data)`` checks exactly what ``sign_data`` signed (verified against OpenBao 2.7.2, PLATFORM.md).

Offline verification lives in :mod:`lepton_tasks.core.signatures` (re-exported here); hvac is imported by
:class:`TransitSigner` only when used.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from lepton_tasks.core.signatures import (
    KEY_TYPE,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    PublicKey,
    Signer,
    SigningError,
    VaultSignature,
    fingerprint,
    format_signature,
    load_public_key,
    normalize_fingerprint,
    parse_signature,
    verify,
)

if TYPE_CHECKING:
    import hvac

    from lepton_tasks.adapters.vault import Vault

__all__ = [
    "COORDINATOR_SIGNER_POLICY",
    "COORDINATOR_TOKEN_PERIOD",
    "KEY_TYPE",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "PublicKey",
    "Signer",
    "SigningError",
    "TransitSigner",
    "VaultSignature",
    "fingerprint",
    "format_signature",
    "load_public_key",
    "normalize_fingerprint",
    "parse_signature",
    "setup_coordinator_signer",
    "signer_policy",
    "verify",
]


def signer_policy(transit_mount: str, key_name: str) -> str:
    """HCL of a signer's policy: sign with ``key_name`` and read its public keys. Nothing else — in particular
    not another key's ``sign`` endpoint, key creation, rotation, export or deletion."""
    return f"""
# Lepton signer policy for transit key {key_name}: sign with it and read its public half. Nothing else.
path "{transit_mount}/sign/{key_name}" {{ capabilities = ["update"] }}
path "{transit_mount}/sign/{key_name}/*" {{ capabilities = ["update"] }}
path "{transit_mount}/keys/{key_name}" {{ capabilities = ["read"] }}
"""


#: the policy of the token the coordinator's Airflow holds: sign with the coordinator key, nothing else
COORDINATOR_SIGNER_POLICY = "coordinator-signer"
#: that token is periodic (renewed by use and by ``lepton up`` / ``vault-init``), never expiring on its own
COORDINATOR_TOKEN_PERIOD = "768h"


def setup_coordinator_signer(root: hvac.Client, key_name: str, *, transit_mount: str = "transit") -> bool:
    """(root) The coordinator's Vault set-up: its non-exportable Ed25519 key ``key_name`` and the policy
    :data:`COORDINATOR_SIGNER_POLICY` (:func:`signer_policy` on that key). No operator policy and no trainer
    role: nothing in the coordinator's Vault can decrypt a partner's data. Idempotent; returns whether the key
    was created now. The token itself is minted by the caller (``vault-init`` installs one with a chosen id;
    the embedded stack mints one)."""
    created = TransitSigner(root, key_name, transit_mount=transit_mount).create_key()
    root.sys.create_or_update_acl_policy(
        name=COORDINATOR_SIGNER_POLICY, policy=signer_policy(transit_mount, key_name)
    )
    return created


def _hvac_errors() -> Any:
    import hvac.exceptions

    return hvac.exceptions


def _describe(exc: BaseException) -> str:
    """A Vault error for a message: the HTTP meaning, never the request (which may hold a token)."""
    detail = str(exc).strip() or type(exc).__name__  # hvac: "<Vault's errors>, on <method> <url>"
    if isinstance(exc, _hvac_errors().Forbidden):
        return f"permission denied (HTTP 403): {detail}"
    return detail


class TransitSigner:
    """Signs with one non-exportable ``ed25519`` key of a Vault transit engine.

    ``client`` is an authenticated :class:`hvac.Client`. Creating the key (:meth:`create_key`) needs a token
    that may write ``<mount>/keys/<name>`` (the admin's, at enrollment); signing and reading the public key
    need only :func:`signer_policy`. Vault errors surface as :class:`SigningError` with the hvac exception as
    ``__cause__`` (``hvac.exceptions.Forbidden`` for a 403).
    """

    def __init__(self, client: hvac.Client, key_name: str, *, transit_mount: str = "transit") -> None:
        if not key_name or "/" in key_name:
            raise ValueError(f"invalid transit key name {key_name!r}")
        # hvac's stubs leave the transit methods untyped: the calls below go through Any
        self.client: Any = client
        self.key_name = key_name
        self.transit_mount = transit_mount

    def __repr__(self) -> str:  # the client (and its token) stays out of reprs and logs
        return f"TransitSigner(key_name={self.key_name!r}, transit_mount={self.transit_mount!r})"

    @classmethod
    def from_vault(cls, vault: Vault, key_name: str) -> TransitSigner:
        """A signer over the client and transit mount of an existing :class:`Vault` adapter."""
        return cls(vault.client, key_name, transit_mount=vault.transit_mount)

    @classmethod
    def connect(
        cls, addr: str, token: str, key_name: str, *, transit_mount: str = "transit"
    ) -> TransitSigner:
        import hvac

        return cls(hvac.Client(url=addr, token=token, timeout=30), key_name, transit_mount=transit_mount)

    # keys ------------------------------------------------------------------------------------------------
    def _key_info(self) -> dict[str, Any] | None:
        errors = _hvac_errors()
        try:
            res = self.client.secrets.transit.read_key(name=self.key_name, mount_point=self.transit_mount)
        except errors.InvalidPath:
            return None
        except errors.VaultError as exc:
            raise SigningError(f"cannot read transit key {self.key_name}: {_describe(exc)}") from exc
        data: dict[str, Any] = res["data"]
        return data

    def _checked_info(self, info: dict[str, Any]) -> dict[str, Any]:
        if info.get("type") != KEY_TYPE:
            raise SigningError(
                f"transit key {self.key_name} is of type {info.get('type')!r}, not {KEY_TYPE!r}: "
                "it cannot make the signatures Lepton verifies"
            )
        if info.get("exportable") or info.get("allow_plaintext_backup"):
            raise SigningError(
                f"transit key {self.key_name} is exportable or allows plaintext backup: "
                "a signing key must never leave Vault"
            )
        return info

    def create_key(self) -> bool:
        """Create the ``ed25519`` key (non-exportable, no plaintext backup) if missing; True when created.

        An existing key of another type, or an exportable one, is an error, never silently reused.
        """
        info = self._key_info()
        if info is not None:
            self._checked_info(info)
            return False
        errors = _hvac_errors()
        try:
            self.client.secrets.transit.create_key(
                name=self.key_name,
                key_type=KEY_TYPE,
                exportable=False,
                allow_plaintext_backup=False,
                mount_point=self.transit_mount,
            )
        except errors.VaultError as exc:
            raise SigningError(f"cannot create transit key {self.key_name}: {_describe(exc)}") from exc
        return True

    def latest_version(self) -> int:
        info = self._key_info()
        if info is None:
            raise SigningError(f"transit key {self.key_name} does not exist")
        return int(self._checked_info(info)["latest_version"])

    def public_key(self, version: int | None = None) -> PublicKey:
        """The public key of ``version`` (default: the latest), as :func:`verify` takes it."""
        info = self._key_info()
        if info is None:
            raise SigningError(f"transit key {self.key_name} does not exist")
        info = self._checked_info(info)
        v = int(info["latest_version"]) if version is None else version
        entry = info.get("keys", {}).get(str(v))
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
            raise SigningError(f"transit key {self.key_name} has no public key for version {v}")
        public_key_b64: str = entry["public_key"]
        load_public_key(public_key_b64)  # Vault answered a well-formed key
        return PublicKey(self.key_name, v, public_key_b64)

    # signing ---------------------------------------------------------------------------------------------
    def sign(self, data: bytes, *, key_version: int | None = None) -> str:
        """Sign ``data`` in Vault; return the signature as ``vault:vN:<b64>``."""
        errors = _hvac_errors()
        try:
            res = self.client.secrets.transit.sign_data(
                name=self.key_name,
                hash_input=base64.b64encode(data).decode("ascii"),
                key_version=key_version,
                mount_point=self.transit_mount,
            )
        except errors.VaultError as exc:
            raise SigningError(f"cannot sign with transit key {self.key_name}: {_describe(exc)}") from exc
        signature = res.get("data", {}).get("signature") if isinstance(res, dict) else None
        if not isinstance(signature, str):
            raise SigningError(f"Vault returned no signature for key {self.key_name}")
        try:
            parse_signature(signature)
        except ValueError as exc:
            raise SigningError(
                f"Vault returned a malformed signature for key {self.key_name}: {exc}"
            ) from exc
        return signature
