"""Read a partner drop (CSV or Parquet) as a stream of bounded DataFrame chunks, rejecting bad files early.

:func:`iter_chunks` is the only entry point. It

1. sniffs the format from the **magic bytes** (``PAR1`` → Parquet; gzip/zip/bzip2/xz/zstd/7z/lz4 →
   ``unsupported_compression``, never decompressed, which also defuses decompression bombs; UTF-16/32 with a
   BOM, or without one but with the telltale NUL byte in every other position → ``unsupported_encoding``;
   mostly-control-byte content → ``unrecognized_format``) and checks it agrees with the extension of the
   object key (``format_mismatch``);
2. for CSV: checks the header line (``wrong_delimiter``, ``bad_header``, ``duplicate_column``,
   ``missing_column``, ``unexpected_column``), then scans the raw bytes once in 8 MiB blocks
   (``nul_bytes``, ``not_utf8``, ``line_too_long``), then parses with ``pyarrow.csv.open_csv``. In the
   default string mode **every column is read as a string** so that type coercion can name the exact row,
   column and value; in typed mode (``typed=True``, the fast path of
   :func:`lepton_tasks.ingest.prepare.prepare_drop`) Arrow converts cells to the contract's types on all cores
   and any conversion problem raises :class:`TypedParseFallback` so the caller re-reads in string mode. A
   row with the wrong number of fields is ``ragged_row`` (``truncated_last_row`` when it is the unterminated
   last line);
3. for Parquet: ignores the columns pandas stored for a DataFrame's index (``__index_level_0__``, named in
   the file's ``pandas`` metadata), checks the schema (``missing_column``, ``unexpected_column``,
   ``duplicate_column``, ``wrong_schema`` for incompatible types) and streams ``ParquetFile.iter_batches``;
4. yields DataFrames of at most ``chunk_rows`` rows, each with a fresh ``RangeIndex`` and
   ``df.attrs["row_offset"]`` = number of data rows before it. Data row ``row_offset + i + 1`` is the
   ``i``-th row of the chunk; row 1 is the first record after the CSV header. Row numbers count *records*:
   blank lines are skipped and a quoted value may span lines (messages also give the physical line when the
   error was found at byte level);
5. raises ``no_data_rows`` at the end when the file had a header but no data.

Values are never interpreted beyond their type: a string cell such as ``=cmd|' /C calc'!A0`` (CSV/formula
injection) is kept as inert text and round-trips unchanged. Anything Lepton later writes for humans must
escape it (``html.escape`` in HTML reports, :func:`lepton_tasks.core.drops.neutralize_formula` in spreadsheet
exports).

Memory is bounded by ``chunk_rows`` (plus one 8 MiB parse block): files of any size stream.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.drops import ALLOWED_EXTENSIONS, DropError, cap_list, clip_text

__all__ = ["MAX_LINE_BYTES", "TypedParseFallback", "iter_chunks", "sniff_format"]

#: a physical line longer than this is rejected (``line_too_long``); also bounds the parser's memory
MAX_LINE_BYTES = 1 << 20
SNIFF_BYTES = 8192
SCAN_BLOCK = 8 << 20

_COMPRESSION_MAGIC: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip (or .xlsx/.docx, which are zip archives)"),
    (b"PK\x05\x06", "zip (empty archive)"),
    (b"PK\x07\x08", "zip (spanned archive)"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"Rar!\x1a\x07", "rar"),
]
_OTHER_MAGIC: list[tuple[bytes, str]] = [
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Excel/Office (.xls) document"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"ARROW1", "an Arrow IPC/Feather file"),
    (b"Obj\x01", "an Avro file"),
    (b"ORC", "an ORC file"),
    (b"SQLite format 3\x00", "a SQLite database"),
]
_BOMS: list[tuple[bytes, str]] = [
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
]
_CSV_FIX = "Export the file as UTF-8 CSV: comma-separated, one header line, one record per line."


def _err(code: str, message: str, key: str, fix: str = "", **kw) -> DropError:
    return DropError(code, message, file=key, fix=fix, **kw)


def _extension_format(object_key: str) -> str | None:
    name = object_key.rsplit("/", 1)[-1].lower()
    for ext, fmt in ALLOWED_EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def _looks_binary(head: bytes) -> bool:
    """More than 5% control bytes (other than TAB/LF/CR/FF) in the first block: not a text file."""
    if not head:
        return False
    arr = np.frombuffer(head, dtype=np.uint8)
    ctrl = ((arr < 0x20) & (arr != 0x09) & (arr != 0x0A) & (arr != 0x0D) & (arr != 0x0C)) | (arr == 0x7F)
    return bool(ctrl.mean() > 0.05)


def _wide_encoding(head: bytes) -> str | None:
    """``"UTF-16 (little-endian)"`` etc. when ``head`` looks like UTF-16/32 text without a byte-order mark.

    ASCII-range text in UTF-16 has a NUL byte in every other position (odd positions little-endian, even
    ones big-endian); in UTF-32 three of every four bytes are NUL. Heuristic: at least 16 bytes, and in one
    phase at least 30% NUL bytes while the other phase has almost none.
    """
    n = len(head) - len(head) % 4
    if n < 16:
        return None
    arr = np.frombuffer(head[:n], dtype=np.uint8).reshape(-1, 4) == 0
    by_position = arr.mean(axis=0)  # share of NUL bytes at positions 0, 1, 2, 3 (mod 4)
    if by_position[1:].min() > 0.3 and by_position[0] < 0.05:
        return "UTF-32 (little-endian)"
    if by_position[:3].min() > 0.3 and by_position[3] < 0.05:
        return "UTF-32 (big-endian)"
    even, odd = by_position[[0, 2]].mean(), by_position[[1, 3]].mean()
    if odd > 0.3 and even < 0.05:
        return "UTF-16 (little-endian)"
    if even > 0.3 and odd < 0.05:
        return "UTF-16 (big-endian)"
    return None


def sniff_format(path: Path, *, object_key: str) -> str:
    """Return ``"csv"`` or ``"parquet"`` from the file's magic bytes, or raise :class:`DropError`.

    The extension of ``object_key`` (when it is ``.csv``/``.parquet``) must agree with the content.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _err(
            "empty_file", "the file is empty (0 bytes)", object_key, "Upload a file with a header and data."
        )
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    expected = _extension_format(object_key)
    if head.startswith(b"PAR1"):
        fmt = "parquet"
    else:
        for magic, what in _COMPRESSION_MAGIC:
            if head.startswith(magic):
                raise _err(
                    "unsupported_compression",
                    f"the file is a {what} archive, not a plain CSV or Parquet file (it was not opened)",
                    object_key,
                    "Upload the uncompressed .csv, or a .parquet file (Parquet compresses internally).",
                )
        if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
            raise _err(
                "unsupported_compression",
                "the file is a bzip2 archive, not a plain CSV or Parquet file (it was not opened)",
                object_key,
                "Upload the uncompressed .csv, or a .parquet file (Parquet compresses internally).",
            )
        for bom, enc in _BOMS:
            if head.startswith(bom):
                raise _err(
                    "unsupported_encoding",
                    f"the file is encoded as {enc}; only UTF-8 is accepted",
                    object_key,
                    _CSV_FIX,
                )
        for magic, what in _OTHER_MAGIC:
            if head.startswith(magic):
                raise _err(
                    "unrecognized_format",
                    f"the file is {what}, not CSV or Parquet",
                    object_key,
                    "Upload a .csv (UTF-8) or .parquet file.",
                )
        wide = _wide_encoding(head)
        if wide is not None:
            codec = wide.replace(" (little-endian)", "LE").replace(" (big-endian)", "BE").replace("-", "")
            raise _err(
                "unsupported_encoding",
                f"the file is probably {wide} text without a byte-order mark (every "
                f"{'fourth' if 'UTF-32' in wide else 'other'} byte is NUL); only UTF-8 is accepted",
                object_key,
                "Re-save the file as UTF-8: in Excel 'Save as' → 'CSV UTF-8 (comma delimited)', or convert "
                f"it with `iconv -f {codec} -t UTF-8 in.csv > out.csv`.",
                details={"encoding": wide},
            )
        if _looks_binary(head):
            raise _err(
                "unrecognized_format",
                "the file is binary data that is neither CSV nor Parquet",
                object_key,
                "Upload a .csv (UTF-8) or .parquet file.",
            )
        fmt = "csv"
    if expected is not None and expected != fmt:
        raise _err(
            "format_mismatch",
            f"the file name says {expected} but its content is {fmt}",
            object_key,
            f"Rename the file to end in .{fmt}, or export it as {expected}.",
        )
    return fmt


# --------------------------------------------------------------------------------------------------- CSV


def _check_header_names(names: list[str], contract: Contract, key: str) -> list[str]:
    """Duplicates, missing required and unexpected columns. Returns the contract columns present, in order."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _err(
                "duplicate_column",
                f"the column {clip_text(name)!r} appears more than once in the header",
                key,
                "Give every column a unique name.",
                column=name,
            )
        seen.add(name)
    missing = [c for c in contract.required_columns() if c not in seen]
    if missing:
        lower = {n.lower().strip(): n for n in names}
        hints = [f"{clip_text(lower[m.lower()])!r} → {m!r}" for m in missing if m.lower() in lower]
        fix = f"Add the column(s) {cap_list(missing)} (expected: {cap_list(contract.columns)})."
        if hints:
            fix += f" Column names are case-sensitive: rename {cap_list(hints)}."
        raise _err(
            "missing_column",
            f"required column(s) missing: {cap_list(missing, fmt=repr)}",
            key,
            fix,
            column=missing[0],
            details={"missing": cap_list(missing), "found": cap_list(names), "found_count": len(names)},
        )
    extra = [n for n in names if n not in contract.columns]
    if extra and not contract.allow_extra_columns:
        raise _err(
            "unexpected_column",
            f"{len(extra):,} unexpected column(s) not in the {contract.version_tag} contract: "
            f"{cap_list(extra, fmt=repr)}",
            key,
            f"Remove the column(s), or ask the operator to add them to the contract. Expected columns: "
            f"{cap_list(contract.columns)}.",
            column=extra[0],
            details={"unexpected_count": len(extra)},
        )
    return [c for c in contract.columns if c in seen]


def _read_header(path: Path, key: str, max_line_bytes: int) -> tuple[list[str], bool]:
    """Parse the header line; return (names, has_more_content)."""
    with path.open("rb") as fh:
        raw = fh.read(max_line_bytes + 4)
        rest = fh.read(1)
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw.strip():
        raise _err("empty_file", "the file contains no header and no data (only whitespace)", key, _CSV_FIX)
    nl = raw.find(b"\n")
    if nl < 0 and (rest or len(raw) > max_line_bytes):
        raise _err(
            "line_too_long",
            f"the header line is longer than {max_line_bytes} bytes",
            key,
            "Check the line endings (LF or CRLF) and that the file really is a CSV.",
            details={"line": 1},
        )
    line = raw if nl < 0 else raw[:nl]
    after = b"" if nl < 0 else raw[nl + 1 :]
    if b"\x00" in line:
        raise _err(
            "nul_bytes", "the header line contains NUL (0x00) bytes", key, _CSV_FIX, details={"line": 1}
        )
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise _err(
            "not_utf8",
            f"the header line is not valid UTF-8 (byte 0x{line[exc.start]:02x} at position {exc.start})",
            key,
            _CSV_FIX,
            details={"line": 1},
        ) from None
    try:
        names = next(csv.reader([text], strict=True))
    except (csv.Error, StopIteration) as exc:
        raise _err("bad_header", f"the header line cannot be parsed as CSV: {exc}", key, _CSV_FIX) from None
    names = [n.strip() for n in names]
    if len(names) == 1:
        for delim, label in ((";", "semicolons (;)"), ("\t", "tabs"), ("|", "pipes (|)")):
            if delim in names[0]:
                raise _err(
                    "wrong_delimiter",
                    f"the header is a single column containing {label}: the file is delimited by {label}, "
                    "not commas",
                    key,
                    "Export with ',' as the field delimiter (and '.' as the decimal separator).",
                    details={"header": names[0][:200]},
                )
    if any(n == "" for n in names):
        pos = [i + 1 for i, n in enumerate(names) if n == ""]
        raise _err(
            "bad_header",
            f"the header has {len(pos):,} empty column name(s) at position(s) {cap_list(pos)}",
            key,
            "Give every column a name; remove trailing delimiters from the header.",
        )
    return names, bool(after.strip() or rest)


def _scan_bytes(path: Path, key: str, max_line_bytes: int) -> None:
    """One pass over the raw bytes: NUL bytes, invalid UTF-8 and over-long lines, with line numbers.

    Line 1 is the header, so data row ≈ line - 1 (exact unless quoted values span lines or lines are blank).
    """
    pending = b""  # bytes after the last newline seen (always starts at a line start)
    pending_line = 1
    first = True
    with path.open("rb") as fh:
        while True:
            block = fh.read(SCAN_BLOCK)
            final = not block
            if first and block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8) :]
            first = False
            data = pending + block
            if not data:
                return
            problems: list[tuple[int, str, str]] = []  # (byte position in data, code, message)
            nul = data.find(b"\x00")
            if nul >= 0:
                problems.append((nul, "nul_bytes", "contains a NUL (0x00) byte"))
            arr = np.frombuffer(data, dtype=np.uint8)
            nls = np.flatnonzero(arr == 0x0A)
            starts = np.concatenate(([0], nls + 1))
            ends = np.concatenate((nls, [len(data)]))
            # the last (maybe partial) line is already too long if it exceeds the limit
            lengths = ends - starts
            long_lines = np.flatnonzero(lengths > max_line_bytes)
            if len(long_lines):
                i = int(long_lines[0])
                problems.append(
                    (int(starts[i]), "line_too_long", f"is longer than {max_line_bytes} bytes (limit)")
                )
            cut = len(data) if final else (int(nls[-1]) + 1 if len(nls) else 0)
            try:
                data[:cut].decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append((exc.start, "not_utf8", f"is not valid UTF-8 (byte 0x{data[exc.start]:02x})"))
            if problems:
                pos, code, what = min(problems)
                line = pending_line + data.count(b"\n", 0, pos)
                row = line - 1 if line > 1 else None
                fix = {
                    "nul_bytes": "Remove NUL bytes; make sure the file is a text CSV, not a binary export.",
                    "line_too_long": "Check the line endings and that no value is a huge blob; one record "
                    "per line.",
                    "not_utf8": "Re-export the file as UTF-8 (e.g. 'CSV UTF-8' in Excel, iconv -t UTF-8).",
                }[code]
                where = f"line {line} (data row {row})" if row else f"line {line} (the header)"
                raise _err(code, f"{where} {what}", key, fix, row=row, details={"line": line})
            if final:
                return
            pending_line += len(nls)
            pending = data[cut:]
            # unreachable (flagged above), but keeps memory bounded whatever happens
            if len(pending) > max_line_bytes:  # pragma: no cover
                raise _err("line_too_long", f"line {pending_line} is longer than {max_line_bytes} bytes", key)


def _locate_bad_record(path: Path, key: str, n_fields: int, parser_message: str) -> DropError:
    """Error path only: find the first record whose field count is wrong (stdlib csv, exact row numbers)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.seek(max(0, size - 1))
        ends_with_newline = fh.read(1) in (b"\n", b"\r")
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        row = 0
        try:
            next(reader)  # header
            for record in reader:
                if not record:  # blank line (pyarrow skips these too)
                    continue
                row += 1
                if len(record) != n_fields:
                    return _ragged(key, row, reader.line_num, n_fields, record, fh, ends_with_newline)
        except csv.Error as exc:
            row += 1
            return _err(
                "malformed_csv",
                f"data row {row} (line {reader.line_num}) cannot be parsed: {exc}",
                key,
                "Check quoting: a value containing a comma, quote or line break must be enclosed in double "
                "quotes, and quotes inside it doubled.",
                row=row,
                details={"line": reader.line_num},
            )
    return _err("malformed_csv", f"the CSV cannot be parsed: {parser_message}", key, _CSV_FIX)


def _ragged(key: str, row: int, line: int, n_fields: int, record: list[str], fh, ends_nl: bool) -> DropError:
    is_last = fh.read(1) == "" and not ends_nl
    sample = {"row": row, "fields": len(record), "text": ",".join(record)[:200]}
    if is_last and len(record) < n_fields:
        return _err(
            "truncated_last_row",
            f"the last line (data row {row}, line {line}) has {len(record)} field(s) instead of {n_fields} "
            "and no line ending: the file looks truncated",
            key,
            "Upload the complete file again (the transfer or export was probably interrupted).",
            row=row,
            samples=[sample],
            details={"line": line},
        )
    return _err(
        "ragged_row",
        f"data row {row} (line {line}) has {len(record)} field(s) instead of {n_fields}",
        key,
        "Every line must have one value per header column; quote values that contain commas.",
        row=row,
        samples=[sample],
        details={"line": line},
    )


class TypedParseFallback(Exception):
    """Typed mode only: Arrow could not convert some cell to the contract's type (or the file is malformed).

    Not an error about the drop: :func:`lepton_tasks.ingest.prepare.prepare_drop` catches it and processes the
    file again in string mode, where :func:`lepton_tasks.ingest.clean.coerce_types` names the exact row,
    column and value (or accepts it: string mode is more lenient, e.g. ``" 12 "``, ``1.0`` for an int, naive
    timestamps).
    """


#: what typed mode reads as a boolean; anything else falls back to string mode (``clean._TRUE``/``_FALSE``)
_TYPED_TRUE = ["true", "True", "TRUE", "t", "T", "yes", "Yes", "YES", "y", "Y", "1"]
_TYPED_FALSE = ["false", "False", "FALSE", "f", "F", "no", "No", "NO", "n", "N", "0"]


def _typed_column_types(contract: Contract, names: list[str]) -> dict[str, pa.DataType]:
    types = {
        "int": pa.int64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }
    return {
        n: types.get(contract.columns[n].dtype, pa.string()) if n in contract.columns else pa.string()
        for n in names
    }


def _iter_csv_tables(
    path: Path, contract: Contract, key: str, max_line_bytes: int, typed: bool = False
) -> Iterator[pa.Table]:
    import pyarrow.csv as pacsv

    names, has_more = _read_header(path, key, max_line_bytes)
    present = _check_header_names(names, contract, key)
    _scan_bytes(path, key, max_line_bytes)
    if not has_more:
        return  # header only: iter_chunks raises no_data_rows
    read_options = pacsv.ReadOptions(
        column_names=names,
        skip_rows=1,
        # Arrow's streaming reader reads up to 32 blocks ahead on its I/O thread: 8 MiB blocks held ~300 MiB
        # of raw CSV in RAM, 2 MiB blocks ~75 MiB, for the same read speed (measured on a 1 GB drop)
        block_size=max(2 << 20, 2 * max_line_bytes),
        use_threads=typed,
    )
    parse_options = pacsv.ParseOptions(delimiter=",", newlines_in_values=True, ignore_empty_lines=True)
    convert_options = pacsv.ConvertOptions(
        column_types=_typed_column_types(contract, names) if typed else {n: pa.string() for n in names},
        include_columns=present,
        strings_can_be_null=True,
        null_values=list(contract.null_values),
        quoted_strings_can_be_null=True,
        true_values=_TYPED_TRUE,
        false_values=_TYPED_FALSE,
    )
    try:
        reader = pacsv.open_csv(
            path, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as exc:
        if typed:
            raise TypedParseFallback(str(exc)) from None
        raise _locate_bad_record(path, key, len(names), str(exc)) from None


# ----------------------------------------------------------------------------------------------- Parquet


def _parquet_type_ok(dtype: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if dtype == "int":
        return pa.types.is_integer(t) or pa.types.is_floating(t) or is_str
    if dtype == "float":
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or is_str
    if dtype == "bool":
        return pa.types.is_boolean(t) or is_str
    if dtype in ("string", "category"):
        return is_str or pa.types.is_integer(t) or pa.types.is_boolean(t)
    if dtype == "timestamp":
        return pa.types.is_timestamp(t) or pa.types.is_date(t) or is_str
    return False  # pragma: no cover


def _pandas_index_columns(schema: pa.Schema, contract: Contract) -> set[str]:
    """Columns that pandas stored for a DataFrame's index (``df.to_parquet()`` keeps a filtered or sorted
    frame's index as ``__index_level_0__``), read from the ``pandas`` schema metadata. They are not data and
    are ignored, unless the index is a contract column (``df.set_index("customer_id")``): then it is data."""
    try:
        meta = schema.pandas_metadata or {}
    except (ValueError, TypeError):  # metadata that is not valid JSON: treat as absent
        return set()
    stored = {c for c in meta.get("index_columns") or [] if isinstance(c, str)}  # a RangeIndex is a dict
    return {c for c in stored if c in schema.names and c not in contract.columns}


def _iter_parquet_tables(path: Path, contract: Contract, key: str, chunk_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    fix = "Write the Parquet file with the columns and types of the contract."
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise _err(
            "corrupt_parquet",
            f"the Parquet file cannot be opened: {exc}",
            key,
            "Upload a complete Parquet file.",
        ) from None
    index_columns = _pandas_index_columns(schema, contract)
    names = [n for n in schema.names if n not in index_columns]
    present = _check_header_names(names, contract, key)
    wrong = []
    for name in present:
        t = schema.field(name).type
        if not _parquet_type_ok(contract.columns[name].dtype, t):
            wrong.append((name, contract.columns[name].dtype, str(t)))
    if wrong:
        name = wrong[0][0]
        raise _err(
            "wrong_schema",
            "incompatible Parquet column type(s): "
            + cap_list((f"{n!r} is {g}, the contract wants {w}" for n, w, g in wrong), sep="; "),
            key,
            fix,
            column=name,
        )
    if pf.metadata.num_rows == 0:
        return
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=present):
            table = pa.Table.from_batches([batch])
            cols = []
            for name in present:
                col = table.column(name)
                if pa.types.is_dictionary(col.type):
                    col = col.cast(col.type.value_type)
                if contract.columns[name].dtype in ("string", "category") and not pa.types.is_string(
                    col.type
                ):
                    col = col.cast(pa.string())
                cols.append(col)
            yield pa.table(cols, names=present)
    except (pa.ArrowException, OSError) as exc:
        raise _err("corrupt_parquet", f"the Parquet file cannot be read: {exc}", key, fix) from None


# ---------------------------------------------------------------------------------------------- chunking


_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _to_frame(table: pa.Table, contract: Contract, row_offset: int) -> pd.DataFrame:
    df = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    for name in contract.columns:
        if name not in df.columns:  # an optional column the file does not have: all missing
            df[name] = pd.Series([None] * len(df), dtype="str")
    df = df[list(contract.columns)]
    df.index = pd.RangeIndex(len(df))
    df.attrs["row_offset"] = row_offset
    return df


def iter_chunks(
    path: Path,
    contract: Contract,
    *,
    object_key: str,
    chunk_rows: int = 200_000,
    max_line_bytes: int = MAX_LINE_BYTES,
    typed: bool = False,
) -> Iterator[pd.DataFrame]:
    """Yield the drop at ``path`` as DataFrames of at most ``chunk_rows`` rows (contract columns, in order).

    CSV cells are strings (missing = NaN, per ``contract.null_values``); Parquet columns keep their stored
    types (strings for string/category columns). Feed each chunk to
    :func:`lepton_tasks.ingest.clean.coerce_types` with ``row_offset=df.attrs["row_offset"]``. Raises
    :class:`DropError` (see the module docstring for codes).

    ``typed=True`` (CSV only; the fast path): Arrow converts the cells to the contract's types while parsing,
    on all cores, and the chunks arrive with their canonical dtypes (``Int64``, ``float64``, ``boolean``,
    ``str``, ``datetime64[us, UTC]``). The first cell Arrow cannot convert — or any parse problem — raises
    :class:`TypedParseFallback` instead of a :class:`DropError`: read the file again with ``typed=False``,
    which names the exact row, column and value. The byte scan and header checks are identical in both modes.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be ≥ 1")
    path = Path(path)
    fmt = sniff_format(path, object_key=object_key)
    tables = (
        _iter_csv_tables(path, contract, object_key, max_line_bytes, typed=typed)
        if fmt == "csv"
        else _iter_parquet_tables(path, contract, object_key, chunk_rows)
    )
    offset = 0
    buffer: list[pa.Table] = []
    buffered = 0
    for table in tables:
        if table.num_rows == 0:
            continue
        buffer.append(table)
        buffered += table.num_rows
        while buffered >= chunk_rows:
            whole = pa.concat_tables(buffer)
            head, tail = whole.slice(0, chunk_rows), whole.slice(chunk_rows)
            yield _to_frame(head, contract, offset)
            offset += chunk_rows
            buffer, buffered = ([tail] if tail.num_rows else []), tail.num_rows
    if buffered:
        yield _to_frame(pa.concat_tables(buffer), contract, offset)
        offset += buffered
    if offset == 0:
        raise _err(
            "no_data_rows",
            "the file has a header but no data rows" if fmt == "csv" else "the Parquet file has no rows",
            object_key,
            "Upload a file that contains at least one data row.",
        )
