"""Drops: the files partners put into their inbox, the structured error that rejects one, and key parsing.

A *drop* is one object ``<dataset>/<file>`` in a partner's inbox bucket. Anything wrong with a drop (its key,
its bytes, its schema, its values) is reported as a :class:`DropError`: a machine-readable ``code`` plus the
file, the 1-based data row and the column when known, a human message, how to fix it and a few failing rows.
``DropError.to_reason()`` is what the quarantine stores as ``reason.json`` next to the rejected original.

This module is imported by DAG files: it must stay light (standard library only).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALLOWED_EXTENSIONS",
    "MAX_KEY_LENGTH",
    "MAX_LISTED",
    "MAX_MESSAGE",
    "MAX_SAMPLES",
    "MAX_VALUE_CHARS",
    "DropError",
    "DropKey",
    "batch_drops",
    "batch_label",
    "cap_list",
    "clip_text",
    "neutralize_formula",
    "parse_drop_key",
]

#: file extensions a drop may have (matched case-insensitively); the *content* is still sniffed by magic bytes
ALLOWED_EXTENSIONS: dict[str, str] = {".csv": "csv", ".parquet": "parquet"}
#: at most this many failing rows travel with an error (keeps ``reason.json`` small and limits data exposure)
MAX_SAMPLES = 5
#: a message lists at most this many values (column names, datasets, allowed values…), then "… and N more"
MAX_LISTED = 10
#: one value quoted in a message or a sample is cut to this many characters (a CSV cell may be 1 MiB long)
MAX_VALUE_CHARS = 200
#: backstop: a message or fix longer than this is cut (every list in one is already capped by cap_list)
MAX_MESSAGE = 2000
#: S3 allows 1024 bytes; we use the same bound
MAX_KEY_LENGTH = 1024
MAX_NAME_LENGTH = 255

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
#: bidi controls (Trojan-Source style reordering) and zero-width / invisible characters, named in messages
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_INVISIBLE = frozenset("\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff")
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zip", ".bz2", ".xz", ".zst", ".zstd", ".7z", ".tgz", ".lz4", ".br")


def clip_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def cap_list(
    values: Iterable[Any], limit: int = MAX_LISTED, *, fmt: Callable[[Any], str] = str, sep: str = ", "
) -> str:
    """``values`` joined for a message, at most ``limit`` of them: ``a, b, c … and 1,990 more``.

    ``fmt`` formats one value (``repr`` to quote names); each formatted value is cut by :func:`clip_text`.
    Every message that lists values goes through this, so a 2,000-column file gives a short message.
    """
    items = list(values)
    shown = sep.join(clip_text(fmt(v)) for v in items[:limit])
    more = len(items) - limit
    return f"{shown} … and {more:,} more" if more > 0 else shown


def batch_drops(drops: Sequence[dict[str, str]], max_batches: int) -> list[list[dict[str, str]]]:
    """Split ``drops`` into at most ``max_batches`` in-order batches of ``ceil(n / max_batches)`` drops each.

    Airflow fails a mapping over more than ``[core] max_map_length`` (1,024) items, so the ingest DAG maps
    over batches: up to ``max_batches`` drops, one drop per task (the usual case); beyond, a few drops per
    task, ingested one after the other.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    size = max(1, -(-len(drops) // max_batches))
    return [list(drops[i : i + size]) for i in range(0, len(drops), size)]


def batch_label(batch: Sequence[dict[str, str]]) -> str:
    """What the Airflow grid shows for a batch: ``partner/key``, plus ``(+N more)`` past the first drop."""
    if not batch:
        return "(empty)"
    first = f"{batch[0]['partner']}/{batch[0]['key']}"
    return first if len(batch) == 1 else f"{first} (+{len(batch) - 1} more)"


def _jsonable(value: Any) -> Any:
    """Best-effort conversion of a sample value to something ``json.dumps`` accepts (numpy scalars, NaN)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return clip_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, bytes):
        return clip_text(value.decode("utf-8", "backslashreplace"))
    text = str(value)
    return None if text in ("nan", "NaT", "<NA>", "None") else clip_text(text)


class DropError(Exception):
    """A drop was rejected. Carries where (file/row/column), why (code/message), how to fix, and samples.

    ``row`` is the 1-based *data* row: row 1 is the first record after the header line (for Parquet, the
    first row of the file). ``samples`` holds at most :data:`MAX_SAMPLES` small dicts of failing rows.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        file: str,
        row: int | None = None,
        column: str | None = None,
        fix: str = "",
        samples: list[dict[str, Any]] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.message = clip_text(message, MAX_MESSAGE)
        self.file = file
        self.row = row
        self.column = None if column is None else clip_text(column)
        self.fix = clip_text(fix, MAX_MESSAGE)
        self.samples = [{str(k): _jsonable(v) for k, v in s.items()} for s in (samples or [])[:MAX_SAMPLES]]
        self.details = {str(k): _jsonable(v) for k, v in (details or {}).items()}
        #: an HTML validation report, attached by :func:`lepton_tasks.ingest.prepare.prepare_drop` (not in
        #: reason.json)
        self.validation_html: str | None = None
        super().__init__(self.__str__())

    def location(self) -> str:
        """``file, row N, column 'c'`` with the parts that are known."""
        parts = [self.file or "(unknown file)"]
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        text = f"[{self.code}] {self.location()}: {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def __repr__(self) -> str:
        return f"DropError(code={self.code!r}, file={self.file!r}, row={self.row!r}, column={self.column!r})"

    # picklable (Airflow / multiprocessing move exceptions across processes)
    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_drop_error,
            (self.code, self.message, self.file, self.row, self.column, self.fix, self.samples, self.details),
        )

    def to_reason(self) -> dict[str, Any]:
        """The JSON-serializable quarantine ``reason.json``."""
        reason = {
            "code": self.code,
            "file": self.file,
            "row": self.row,
            "column": self.column,
            "message": self.message,
            "fix": self.fix,
            "samples": self.samples,
            "details": self.details,
        }
        json.dumps(reason)  # fail here, not at upload time, if something is not serializable
        return reason


def _rebuild_drop_error(
    code: str,
    message: str,
    file: str,
    row: int | None,
    column: str | None,
    fix: str,
    samples: list[dict[str, Any]],
    details: dict[str, Any],
) -> DropError:
    return DropError(
        code, message, file=file, row=row, column=column, fix=fix, samples=samples, details=details
    )


@dataclass(frozen=True)
class DropKey:
    """A validated inbox object key ``<dataset>/<filename>``."""

    dataset: str
    filename: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.filename}"

    @property
    def extension(self) -> str:
        """Lower-cased extension including the dot (``.csv`` or ``.parquet``)."""
        return "." + self.filename.rsplit(".", 1)[1].lower()

    @property
    def format(self) -> str:
        """``csv`` or ``parquet`` as suggested by the extension (readers still check the magic bytes)."""
        return ALLOWED_EXTENSIONS[self.extension]

    @property
    def stem(self) -> str:
        return self.filename.rsplit(".", 1)[0]


def _describe_char(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def parse_drop_key(key: str, known_datasets: list[str]) -> DropKey:
    """Parse and validate an inbox object key; raise :class:`DropError` with a specific ``code`` if unsafe.

    Accepted: exactly ``<dataset>/<filename>`` where ``dataset`` is one of ``known_datasets`` and ``filename``
    uses only ASCII letters, digits, ``.``, ``_`` and ``-``, does not start with ``.``, is at most 255
    characters and ends in ``.csv`` or ``.parquet`` (any case). Deliberately strict: names end up in staging
    keys, logs and HTML reports, so anything that could traverse, hide or reorder text is refused.

    Codes, in the order they are checked:

    * ``key_empty`` — empty key; ``key_too_long`` — over 1024 characters;
    * ``key_control_chars`` — NUL or another control character (C0, DEL, C1);
    * ``key_unicode`` — any non-ASCII character: bidi controls (e.g. U+202E), zero-width/invisible characters,
      non-NFC sequences and look-alike letters are all refused (the message names the character);
    * ``key_backslash`` — a ``\\`` (Windows separator / escaping tricks);
    * ``key_absolute`` — a leading ``/``;
    * ``key_traversal`` — a ``..`` or ``.`` segment, or an empty segment (``a//b``, trailing ``/``);
    * ``key_outside_dataset`` — a file at the bucket root (no dataset folder);
    * ``key_too_deep`` — more than ``<dataset>/<file>``;
    * ``key_bad_name`` — a dataset or file name with other characters, a hidden (dot) file, or too long;
    * ``unknown_dataset`` — the folder is not a dataset with a contract;
    * ``unsupported_extension`` — not ``.csv``/``.parquet`` (compressed files are named as such).
    """
    fix_layout = "Upload files as <dataset>/<file>.csv or <dataset>/<file>.parquet, e.g. banks/2024-06.csv."

    def fail(code: str, message: str, fix: str = fix_layout) -> DropError:
        return DropError(code, message, file=key if isinstance(key, str) else repr(key), fix=fix)

    if not isinstance(key, str) or key == "":
        raise fail("key_empty", "the object key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise fail("key_too_long", f"the object key has {len(key)} characters (limit {MAX_KEY_LENGTH})")
    for ch in key:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            raise fail(
                "key_control_chars", f"the object key contains the control character {_describe_char(ch)}"
            )
    for ch in key:
        if ord(ch) > 127:
            if ch in _BIDI:
                why = "a bidirectional-text control (it can make a name display differently than it is)"
            elif ch in _INVISIBLE or unicodedata.category(ch) == "Cf":
                why = "an invisible zero-width/format character"
            elif unicodedata.normalize("NFC", key) != key:
                why = "a non-NFC (decomposed) Unicode sequence"
            else:
                why = "a non-ASCII character"
            raise fail(
                "key_unicode",
                f"the object key contains {why}: {_describe_char(ch)}",
                "Use only ASCII letters, digits, '.', '_' and '-' in dataset and file names.",
            )
    if "\\" in key:
        raise fail("key_backslash", "the object key contains a backslash '\\'")
    if key.startswith("/"):
        raise fail("key_absolute", "the object key is an absolute path (it starts with '/')")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        raise fail("key_traversal", "the object key contains a '..' or '.' path segment")
    if any(p == "" for p in parts):
        raise fail("key_traversal", "the object key contains an empty path segment ('//' or a trailing '/')")
    if len(parts) == 1:
        raise fail(
            "key_outside_dataset",
            "the file is at the bucket root, not inside a dataset folder",
            f"Move it into one of the dataset folders: {cap_list(sorted(known_datasets)) or '(none)'}/.",
        )
    if len(parts) > 2:
        raise fail(
            "key_too_deep", f"the object key has {len(parts) - 1} folder levels; only <dataset>/<file>"
        )
    dataset, filename = parts
    for label, name in (("dataset folder", dataset), ("file name", filename)):
        bad = sorted({ch for ch in name if ch not in _NAME_CHARS})
        if bad:
            raise fail(
                "key_bad_name",
                f"the {label} {clip_text(name)!r} contains characters that are not allowed: "
                f"{cap_list(bad, 20, fmt=repr)}",
                "Use only ASCII letters, digits, '.', '_' and '-' in dataset and file names.",
            )
        if len(name) > MAX_NAME_LENGTH:
            raise fail("key_bad_name", f"the {label} is longer than {MAX_NAME_LENGTH} characters")
    if filename.startswith("."):
        raise fail("key_bad_name", f"the file name {filename!r} is a hidden (dot) file")
    if dataset not in known_datasets:
        raise fail(
            "unknown_dataset",
            f"there is no dataset {dataset!r}",
            f"Known datasets are: {cap_list(sorted(known_datasets)) or '(none)'}.",
        )
    lower = filename.lower()
    ext = "." + lower.rsplit(".", 1)[1] if "." in lower else ""
    if ext not in ALLOWED_EXTENSIONS:
        if lower.endswith(_COMPRESSED_SUFFIXES):
            msg = f"compressed files ({ext}) are not accepted"
            fix = "Upload the uncompressed .csv, or a .parquet file (which is compressed internally)."
        else:
            msg = f"the extension {ext or '(none)'!r} is not supported"
            fix = "Upload a .csv (UTF-8, comma-separated, with a header line) or a .parquet file."
        raise fail("unsupported_extension", msg, fix)
    if len(filename) == len(ext):
        raise fail("key_bad_name", f"the file name {filename!r} has no name before the extension")
    return DropKey(dataset=dataset, filename=filename)


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralize_formula(value: str) -> str:
    """Make a cell safe to show in a spreadsheet *export* meant for humans (CSV injection, OWASP).

    Lepton keeps partner values as inert data everywhere (Parquet, training frames: a value like
    ``=cmd|' /C calc'!A0`` is never evaluated and round-trips unchanged). Only when Lepton writes a CSV that a
    person may open in a spreadsheet must it call this, which prefixes a ``'`` to values starting with
    ``= + - @``, TAB or CR. HTML output uses ``html.escape`` instead.
    """
    if value and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value
