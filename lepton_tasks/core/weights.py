"""Weight updates on the wire: a list of numpy arrays plus a JSON ``meta`` dict, as bytes, without pickle.

Format: an ``.npz`` archive (``np.savez``, uncompressed) holding the arrays as ``a00000``, ``a00001``, … and
the meta as a UTF-8 JSON document stored in a ``uint8`` array named ``__meta__``. The meta records the format
version and every array's dtype and shape; :func:`loads` reads with ``allow_pickle=False`` (an object array
raises instead of executing a pickle) and checks every array against that record.

The bytes of two :func:`dumps` calls on the same arrays can differ (zip timestamps), so use
:func:`fingerprint` to identify *content* (e.g. "which global model was this update computed from") and
:func:`sha256` to identify *an object* (e.g. a checksum stored beside an uploaded file).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMAT = "lepton-weights"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
#: refuse archives whose declared (uncompressed) size exceeds this: a guard against zip bombs
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
#: dtype kinds accepted: bool, signed/unsigned int, float
_ALLOWED_KINDS = frozenset("biuf")


def _key(i: int) -> str:
    return f"a{i:05d}"


def dumps(arrays: Sequence[np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize ``arrays`` (numeric numpy arrays, order kept) and a JSON-serializable ``meta`` dict.

    Raises ``ValueError`` for an object/string/structured dtype (those would need pickle) or a ``meta``
    that is not JSON-serializable or uses the reserved keys ``format``/``format_version``/``arrays``.
    """
    meta = dict(meta or {})
    reserved = {"format", "format_version", "arrays"} & meta.keys()
    if reserved:
        raise ValueError(f"meta keys {sorted(reserved)} are reserved by the weights format")
    arrs: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.kind not in _ALLOWED_KINDS or a.dtype.fields is not None:
            raise ValueError(f"array {i} has dtype {a.dtype}: only bool/int/float arrays can be serialized")
        arrs.append(a)
    record = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrs],
    }
    try:
        meta_bytes = json.dumps(record, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-serializable: {exc}") from exc
    buf = io.BytesIO()
    payload = {_key(i): a for i, a in enumerate(arrs)}
    payload[_META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)
    np.savez(buf, allow_pickle=False, **payload)
    return buf.getvalue()


def loads(data: bytes) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Inverse of :func:`dumps`: return ``(arrays, meta)``; ``meta`` excludes the format's own keys.

    Raises ``ValueError`` when the bytes are not a weights archive of this format, contain a pickled
    (object) array, or an array does not match the dtype/shape recorded in the meta.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except zipfile.BadZipFile as exc:
        raise ValueError("not a weights archive (not a zip/npz file)") from exc
    if declared > MAX_UNCOMPRESSED_BYTES:
        raise ValueError(
            f"weights archive declares {declared} bytes, above the {MAX_UNCOMPRESSED_BYTES} limit"
        )
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            files = set(npz.files)
            if _META_KEY not in files:
                raise ValueError("not a weights archive: no meta record")
            meta_arr = npz[_META_KEY]
            if meta_arr.dtype != np.uint8 or meta_arr.ndim != 1:
                raise ValueError("corrupt weights archive: meta record is not a uint8 vector")
            record = json.loads(meta_arr.tobytes().decode("utf-8"))
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ValueError("not a weights archive: wrong format tag")
            if record.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"unsupported weights format version {record.get('format_version')!r} "
                    f"(this code reads version {FORMAT_VERSION})"
                )
            specs = record.get("arrays")
            if not isinstance(specs, list):
                raise ValueError("corrupt weights archive: no array list in meta")
            expected = {_key(i) for i in range(len(specs))} | {_META_KEY}
            if files != expected:
                raise ValueError(
                    f"corrupt weights archive: members {sorted(files ^ expected)} do not match the meta"
                )
            arrays: list[np.ndarray] = []
            for i, spec in enumerate(specs):
                a = npz[_key(i)]
                if a.dtype.str != spec.get("dtype") or list(a.shape) != spec.get("shape"):
                    raise ValueError(
                        f"array {i} is {a.dtype.str}{list(a.shape)}, "
                        f"meta says {spec.get('dtype')}{spec.get('shape')}"
                    )
                arrays.append(a)
    except ValueError as exc:
        # np.load raises ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if "allow_pickle" in str(exc):
            raise ValueError("weights archive contains a pickled (object) array: refused") from exc
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"corrupt weights archive: {exc}") from exc
    meta = {k: v for k, v in record.items() if k not in {"format", "format_version", "arrays"}}
    return arrays, meta


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (a checksum of the serialized object)."""
    return hashlib.sha256(data).hexdigest()


def fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """Hex SHA-256 over the arrays' dtypes, shapes and little-endian bytes: equal iff the content is equal.

    Unlike ``sha256(dumps(arrays))`` this does not depend on zip timestamps, so it identifies a model.
    """
    h = hashlib.sha256(f"{FORMAT}/v{FORMAT_VERSION}/{len(arrays)}".encode())
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind not in _ALLOWED_KINDS:
            raise ValueError(f"cannot fingerprint an array of dtype {a.dtype}")
        le = a.astype(a.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
        h.update(f"|{le.dtype.str}{list(le.shape)}|".encode())
        h.update(le.tobytes())
    return h.hexdigest()
