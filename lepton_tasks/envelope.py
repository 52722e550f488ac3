"""Envelope encryption of partner files: Tink streaming AEAD under a per-object key, wrapped by Vault.

Format of an encrypted object (one format, used everywhere)::

    b"LEPTON-ENV1\\n" | uint32 big-endian length N | N bytes: encrypted Tink keyset (JSON) | Tink ciphertext

- the data key is a fresh Tink keyset per object (``AES256_GCM_HKDF_1MB`` streaming AEAD, a reviewed
  construction with 1 MiB segments), so an object never shares a key with another;
- the keyset is encrypted with ``KmsEnvelopeAead(AES256_GCM, <Vault transit key of the partner>)``: Vault
  wraps a per-keyset DEK, Tink never sees the transit key; Vault is called O(1) times per object;
- associated data binds the partner and the object's bucket/key: a ciphertext copied to another key or
  attributed to another partner fails to decrypt.

Decryption writes to a temporary file and publishes it only after the whole stream authenticated, because a
streaming AEAD reports tampering of a late segment only when that segment is read.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import hvac
import tink
from tink import aead, json_proto_keyset_format, streaming_aead
from tink.integration import hcvault

MAGIC = b"LEPTON-ENV1\n"
_CHUNK = 1024 * 1024
_registered = False


class EnvelopeError(RuntimeError):
    """Decryption or encryption failed; the message names the object and the likely cause."""


def _register() -> None:
    global _registered
    if not _registered:
        aead.register()
        streaming_aead.register()
        _registered = True


def associated_data(partner: str, bucket: str, key: str) -> bytes:
    """The associated data that binds a ciphertext to its partner and location."""
    return f"lepton/v1|partner={partner}|object=s3://{bucket}/{key}".encode()


def _kek(client: hvac.Client, transit_mount: str, key_name: str) -> aead.Aead:
    remote = hcvault.new_aead(f"{transit_mount}/keys/{key_name}", client)
    return aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, remote)


class _HashingWriter(io.RawIOBase):
    """Writes through to a file, hashing what passes (no second read of the ciphertext); Tink's ``close()``
    of the encrypting stream leaves the file open."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.sha256.update(b)
        return self._f.write(b)

    def close(self) -> None:
        self._f.flush()
        super().close()


def encrypt_file(src: Path, dst: Path, *, client: hvac.Client, key_name: str, ad: bytes,
                 transit_mount: str = "transit") -> str:
    """Encrypt ``src`` into ``dst`` (envelope format above); return the SHA-256 of the ciphertext."""
    _register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    try:
        wrapped = json_proto_keyset_format.serialize_encrypted(handle, _kek(client, transit_mount, key_name), ad)
    except tink.TinkError as exc:
        raise EnvelopeError(f"cannot wrap the data key of {src.name} with Vault key {key_name}: {exc}") from exc
    primitive = handle.primitive(streaming_aead.StreamingAead)
    wrapped_b = wrapped.encode()
    with open(dst, "wb") as out:
        sink = _HashingWriter(out)
        sink.write(MAGIC + struct.pack(">I", len(wrapped_b)) + wrapped_b)
        with open(src, "rb") as f, primitive.new_encrypting_stream(sink, ad) as enc:  # type: ignore[arg-type]
            while block := f.read(_CHUNK):
                enc.write(block)
    return sink.sha256.hexdigest()


def _read_header(f: BinaryIO, object_name: str) -> str:
    """The wrapped keyset at the start of an envelope; the file is left at the start of the ciphertext."""
    head = f.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
        raise EnvelopeError(f"{object_name}: not a Lepton envelope (bad header) — was it modified or moved?")
    (n,) = struct.unpack(">I", head[len(MAGIC):])
    if n > 64 * 1024:
        raise EnvelopeError(f"{object_name}: corrupt envelope header (keyset length {n})")
    return f.read(n).decode("utf-8", errors="replace")


def decrypt_file(src: Path, dst: Path, *, client: hvac.Client, key_name: str, ad: bytes, object_name: str,
                 transit_mount: str = "transit") -> Path:
    """Decrypt ``src`` into ``dst``; ``dst`` appears only if the whole ciphertext authenticated."""
    _register()
    with open(src, "rb") as f:
        wrapped = _read_header(f, object_name)
        try:
            handle = json_proto_keyset_format.parse_encrypted(wrapped, _kek(client, transit_mount, key_name), ad)
        except tink.TinkError as exc:
            cause = exc.args[0] if exc.args else exc
            if isinstance(cause, hvac.exceptions.Forbidden):
                raise EnvelopeError(
                    f"{object_name}: Vault denied decryption with key {key_name} (permission denied): "
                    f"this token is not allowed to use that partner's key"
                ) from exc
            raise EnvelopeError(
                f"{object_name}: cannot unwrap the data key with Vault key {key_name}: the object was tampered "
                f"with, moved, belongs to another partner, or its key version is no longer allowed ({exc})"
            ) from exc
        primitive = handle.primitive(streaming_aead.StreamingAead)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".dec-")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with primitive.new_decrypting_stream(f, ad) as dec:  # type: ignore[arg-type]
                        while block := dec.read(_CHUNK):
                            out.write(block)
                except tink.TinkError as exc:
                    raise EnvelopeError(
                        f"{object_name}: ciphertext failed authentication (tampered or truncated): {exc}"
                    ) from exc
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dst


def rewrap_file(src: Path, dst: Path, *, client: hvac.Client, key_name: str, ad: bytes, object_name: str,
                transit_mount: str = "transit") -> None:
    """Re-wrap an object's data key under the latest version of its transit key; the ciphertext body is copied.

    Used after ``rotate`` so that ``min_decryption_version`` can be raised without re-encrypting the data.
    """
    import shutil

    _register()
    kek = _kek(client, transit_mount, key_name)
    with open(src, "rb") as f:
        wrapped = _read_header(f, object_name)
        try:
            handle = json_proto_keyset_format.parse_encrypted(wrapped, kek, ad)
            rewrapped = json_proto_keyset_format.serialize_encrypted(handle, kek, ad).encode()
        except tink.TinkError as exc:
            raise EnvelopeError(f"{object_name}: cannot rewrap the data key with {key_name}: {exc}") from exc
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".rewrap-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC + struct.pack(">I", len(rewrapped)) + rewrapped)
                shutil.copyfileobj(f, out, _CHUNK)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
