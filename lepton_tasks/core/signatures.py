"""Ed25519 signatures in Vault transit's format, verified offline with ``cryptography`` (no Vault needed).

A *verifier* holds only the signer's public key (base64, as Vault's ``read_key`` returns it), pinned at
enrollment and compared by a human through its :func:`fingerprint`. Signatures travel in Vault's own format,
``vault:v<version>:<base64 of the 64-byte Ed25519 signature>``; :func:`parse_signature` accepts nothing else
(no whitespace, no URL-safe alphabet, no missing padding). Vault's ed25519 keys sign the raw input (pure
Ed25519, no pre-hash), so ``Ed25519PublicKey.verify(signature, data)`` checks exactly what ``sign_data``
signed (verified against OpenBao 2.7.2). The signing side (a key in Vault) is
:class:`lepton_tasks.adapters.signing.TransitSigner`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "KEY_TYPE",
    "PublicKey",
    "Signer",
    "SigningError",
    "VaultSignature",
    "fingerprint",
    "format_signature",
    "load_public_key",
    "normalize_fingerprint",
    "parse_signature",
    "verify",
]

KEY_TYPE = "ed25519"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# strict standard base64 of exactly 64 bytes: 86 alphabet characters then "==" (canonical: last char in the
# set whose low 4 bits are zero, so no two strings decode to the same signature)
_SIGNATURE_RE = re.compile(r"vault:v([1-9][0-9]{0,8}):([A-Za-z0-9+/]{85}[AQgw]==)")
_FINGERPRINT_HEX_RE = re.compile(r"[0-9a-f]{64}")


class SigningError(RuntimeError):
    """Signing or reading a signing key in Vault failed; the message names the key (never a token)."""


class Signer(Protocol):
    """What :func:`lepton_tasks.core.exchange.seal` needs: sign bytes, get ``vault:vN:<b64>`` back.

    :class:`TransitSigner` is the real one; a test may stand in with a local Ed25519 key.
    """

    def sign(self, data: bytes) -> str: ...


@dataclass(frozen=True)
class VaultSignature:
    """A parsed ``vault:vN:<b64>`` signature."""

    key_version: int
    signature: bytes

    def __str__(self) -> str:
        return format_signature(self.key_version, self.signature)


@dataclass(frozen=True)
class PublicKey:
    """The public half of one version of a signing key, as a verifier pins it."""

    key_name: str
    version: int
    public_key_b64: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key_b64)


def format_signature(key_version: int, signature: bytes) -> str:
    """``vault:v<key_version>:<base64>`` for a raw 64-byte Ed25519 signature."""
    if key_version < 1 or len(signature) != SIGNATURE_BYTES:
        raise ValueError("an Ed25519 signature is 64 bytes and key versions start at 1")
    return f"vault:v{key_version}:{base64.b64encode(signature).decode('ascii')}"


def parse_signature(signature: str) -> VaultSignature:
    """Parse ``vault:vN:<b64>`` strictly; raise :class:`ValueError` saying what is wrong."""
    if not isinstance(signature, str):
        raise ValueError(f"signature must be a string, not {type(signature).__name__}")
    m = _SIGNATURE_RE.fullmatch(signature)
    if m is None:
        raise ValueError("signature is not in Vault's format vault:v<version>:<standard base64 of 64 bytes>")
    raw = base64.b64decode(m.group(2), validate=True)
    return VaultSignature(int(m.group(1)), raw)


def load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    """An Ed25519 public key from standard base64 of its 32 raw bytes; :class:`ValueError` otherwise."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("public key is not standard base64") from exc
    if len(raw) != PUBLIC_KEY_BYTES or base64.b64encode(raw).decode("ascii") != public_key_b64:
        raise ValueError(f"public key must be the canonical base64 of {PUBLIC_KEY_BYTES} raw Ed25519 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public_key_b64: str) -> str:
    """SHA-256 of the raw public key, lower-case hex in 16 space-separated groups of 4 (for humans to read
    aloud and compare at enrollment), e.g. ``"3f2a 9c41 … 07be"``."""
    raw = load_public_key(public_key_b64).public_bytes_raw()
    digest = hashlib.sha256(raw).hexdigest()
    return " ".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def normalize_fingerprint(value: str) -> str:
    """A fingerprint as written by a human (any case, spaces or colons between groups) → the canonical form
    of :func:`fingerprint`; :class:`ValueError` when it is not 32 bytes of hex."""
    compact = re.sub(r"[\s:]", "", value).lower()
    if not _FINGERPRINT_HEX_RE.fullmatch(compact):
        raise ValueError("a fingerprint is the 64 hex digits of a SHA-256 (spaces or colons allowed)")
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def verify(public_key_b64: str, data: bytes, signature: str, *, key_version: int | None = None) -> bool:
    """Whether ``signature`` (``vault:vN:<b64>``) is a valid Ed25519 signature of ``data`` under the key.

    Offline: no Vault. A malformed signature, or (when ``key_version`` is given) one made with another version
    of the key, is simply invalid (``False``). A malformed *public key* is a configuration error and raises
    :class:`ValueError` — it comes from the verifier's own pinned configuration, not from the message.
    """
    key = load_public_key(public_key_b64)
    try:
        parsed = parse_signature(signature)
    except ValueError:
        return False
    if key_version is not None and parsed.key_version != key_version:
        return False
    try:
        key.verify(parsed.signature, data)
    except InvalidSignature:
        return False
    return True
