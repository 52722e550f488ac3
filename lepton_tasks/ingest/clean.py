"""Type coercion and cleaning of one drop, chunk by chunk.

* :func:`coerce_types` turns the reader's string cells (or Parquet's stored types) into the contract's dtypes
  and rejects the drop (``wrong_type``) naming the row, the column and the bad value.
* :class:`Cleaner` is stateful across the chunks of one drop: exact-duplicate removal (also across chunks),
  the ``drop`` missing-value policy, outlier clipping, and a JSON-able :class:`CleaningReport` of what it did.

Row numbers: a chunk from :func:`lepton_tasks.ingest.readers.iter_chunks` has a ``RangeIndex``; row
``row_offset + label + 1`` of the file is the row with index ``label``. Cleaning filters rows but never resets
the index, so later steps (validation, error messages) still name the original row.

Canonical dtypes after :func:`coerce_types`: ``int`` → ``Int64``, ``float`` → ``float64``, ``bool`` →
``boolean``, ``string``/``category`` → ``str`` (values untouched: no stripping, no case folding, formulas stay
inert text), ``timestamp`` → ``datetime64[us, UTC]`` (ISO-8601; naive values are taken as UTC).
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from lepton_tasks.core.contracts import ColumnSpec, Contract
from lepton_tasks.core.drops import MAX_SAMPLES, DropError, clip_text
from lepton_tasks.core.hashing import ChunkHashes, SeenHashes
from lepton_tasks.core.hashing import row_hashes as _row_hashes

__all__ = ["Cleaner", "CleaningReport", "coerce_types", "row_hashes", "row_numbers"]

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_HASH_KEY = "lepton-dedup-v1."  # 16 bytes: siphash key of pandas' hash_array


def row_numbers(df: pd.DataFrame, row_offset: int) -> np.ndarray:
    """1-based file row numbers of ``df``'s rows (index labels are 0-based positions in the chunk)."""
    return np.asarray(df.index, dtype=np.int64) + int(row_offset) + 1


def _is_stringish(s: pd.Series) -> bool:
    return s.dtype == object or isinstance(s.dtype, pd.StringDtype) or pd.api.types.is_string_dtype(s.dtype)


def _fail_values(
    s: pd.Series, bad: np.ndarray, *, column: str, spec: ColumnSpec, key: str, row_offset: int, why: str
) -> DropError:
    rows = (np.asarray(s.index, dtype=np.int64) + int(row_offset) + 1)[bad]
    values = s[bad]
    first_row, first_val = int(rows[0]), values.iloc[0]
    fix = {
        "int": "Use whole numbers without thousands separators (e.g. 1234).",
        "float": "Use numbers with '.' as the decimal point and no thousands separators (e.g. 1234.5).",
        "bool": "Use true/false (also accepted: yes/no, 1/0, t/f, y/n).",
        "timestamp": "Use ISO-8601 timestamps, e.g. 2024-03-01T12:34:56Z (naive values are read as UTC).",
    }.get(spec.dtype, "Fix the value.")
    return DropError(
        "wrong_type",
        f"{clip_text(repr(first_val))} is not a valid {spec.dtype}{why} "
        f"({int(bad.sum()):,} bad value(s) in this chunk)",
        file=key,
        row=first_row,
        column=column,
        fix=fix,
        samples=[
            {"row": int(r), column: v}
            for r, v in zip(rows[:MAX_SAMPLES], values.iloc[:MAX_SAMPLES], strict=True)
        ],
        details={"dtype": spec.dtype, "bad_values_in_chunk": int(bad.sum())},
    )


class _FailWhere(TypedDict):
    """Where a bad value is: the keyword arguments of :func:`_fail_values` other than ``why``."""

    column: str
    spec: ColumnSpec
    key: str
    row_offset: int


def _coerce_numeric(s: pd.Series, spec: ColumnSpec, column: str, key: str, row_offset: int) -> pd.Series:
    present = s.notna().to_numpy()
    kw: _FailWhere = {"column": column, "spec": spec, "key": key, "row_offset": row_offset}
    if pd.api.types.is_bool_dtype(s.dtype):
        if present.any():
            raise _fail_values(s, present, why=" (a boolean)", **kw)
        num = s.astype("float64")
    elif _is_stringish(s):
        num = pd.to_numeric(s.astype("str").str.strip(), errors="coerce")
    else:
        num = pd.to_numeric(s, errors="coerce")
    values = num.to_numpy(dtype="float64", na_value=np.nan)
    bad = present & ~np.isfinite(values)
    if bad.any():
        first_inf = bool(np.isinf(values[bad][0]))
        raise _fail_values(s, bad, why=" (infinite values are not allowed)" if first_inf else "", **kw)
    if spec.dtype == "float":
        return pd.Series(values, index=s.index, dtype="float64")
    if pd.api.types.is_integer_dtype(num.dtype):  # exact, no float round trip
        return num.astype("Int64")
    bad = present & ((values != np.floor(values)) | (np.abs(values) > 2**53))
    if bad.any():
        raise _fail_values(s, bad, why=" (not a whole number)", **kw)
    return pd.Series(values, index=s.index).astype("Int64")


def _coerce_bool(s: pd.Series, spec: ColumnSpec, column: str, key: str, row_offset: int) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("boolean")
    text = s.astype("str").str.strip().str.lower()
    is_true, is_false = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()
    present = s.notna().to_numpy()
    bad = present & ~is_true & ~is_false
    if bad.any():
        raise _fail_values(s, bad, column=column, spec=spec, key=key, row_offset=row_offset, why="")
    out = pd.array(np.where(is_true, True, False), dtype="boolean")
    out[~present] = pd.NA
    return pd.Series(out, index=s.index)


def _coerce_timestamp(s: pd.Series, spec: ColumnSpec, column: str, key: str, row_offset: int) -> pd.Series:
    present = s.notna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        ts = s if getattr(s.dtype, "tz", None) is not None else s.dt.tz_localize("UTC")
        return ts.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    if not _is_stringish(s):  # dates from Parquet (date32) arrive as objects
        s = s.astype("str")
    ts = pd.to_datetime(s.astype("str").str.strip(), utc=True, format="ISO8601", errors="coerce")
    bad = present & ts.isna().to_numpy()
    if bad.any():
        raise _fail_values(
            s, bad, column=column, spec=spec, key=key, row_offset=row_offset, why=" (ISO-8601)"
        )
    return ts.astype("datetime64[us, UTC]")


def coerce_types(
    df: pd.DataFrame, contract: Contract, *, object_key: str, row_offset: int = 0
) -> pd.DataFrame:
    """Return a copy of ``df`` with each contract column converted to its canonical dtype.

    Raises :class:`DropError` ``wrong_type`` naming the first bad row, the column and the value (with up to
    5 samples). Missing cells stay missing (validation and cleaning decide what to do with them).
    """
    out = {}
    for column, spec in contract.columns.items():
        if column not in df.columns:
            raise DropError("missing_column", f"column {column!r} is missing", file=object_key, column=column)
        s = df[column]
        if spec.dtype in ("int", "float"):
            out[column] = _coerce_numeric(s, spec, column, object_key, row_offset)
        elif spec.dtype == "bool":
            out[column] = _coerce_bool(s, spec, column, object_key, row_offset)
        elif spec.dtype == "timestamp":
            out[column] = _coerce_timestamp(s, spec, column, object_key, row_offset)
        else:  # string, category: kept verbatim
            out[column] = s if s.dtype == "str" else s.astype("str")
    typed = pd.DataFrame(out, index=df.index)
    typed.attrs.update(df.attrs)
    return typed


# ----------------------------------------------------------------------------------------------- hashing


def row_hashes(df: pd.DataFrame, columns: list[str] | None = None) -> np.ndarray:
    """Stable uint64 hash per row of ``df[columns]`` (siphash of the values; index ignored)."""
    return _row_hashes(df, columns, hash_key=_HASH_KEY)


# ---------------------------------------------------------------------------------------------- cleaning


class CleaningReport(BaseModel):
    """What cleaning did to one drop (JSON-able; counts per action and per column)."""

    object_key: str = ""
    rows_in: int = 0
    duplicates_removed: int = 0
    #: rows dropped because of a missing value, per column (a row with several missing cells counts in each)
    rows_dropped_missing: dict[str, int] = Field(default_factory=dict)
    #: total rows dropped for missing values (each row once)
    rows_dropped: int = 0
    values_clipped: dict[str, int] = Field(default_factory=dict)
    #: missing values kept for normalization to fill (policies mean/mode/constant/indicator)
    nulls_kept: dict[str, int] = Field(default_factory=dict)
    rows_out: int = 0

    def _bump(self, field: str, column: str, n: int) -> None:
        if n:
            counts = getattr(self, field)
            counts[column] = counts.get(column, 0) + int(n)


class Cleaner:
    """Cleans the chunks of ONE drop, in order. Use :meth:`process` per chunk, then read :attr:`report`.

    Steps: (1) :meth:`drop_duplicates` removes rows identical (after typing) to an earlier row of the drop,
    in this chunk or a previous one; (2) :meth:`apply` drops rows with a missing value where the policy is
    ``drop`` — and always where the label, a ``row_key`` column or an ``id``/``timestamp``-role column is
    missing, since such a row cannot be split or trained on — counts the other missing values as kept, and
    clips values outside ``clip`` bounds. Row order and index labels are preserved.
    """

    def __init__(self, contract: Contract, *, object_key: str = "", spill_dir: str | None = None) -> None:
        self.contract = contract
        self.report = CleaningReport(object_key=object_key)
        self._seen = SeenHashes(tmp_dir=spill_dir)
        self._columns = list(contract.columns)

    def drop_duplicates(self, df: pd.DataFrame, hashes: ChunkHashes | None = None) -> pd.DataFrame:
        """Remove rows equal to an earlier row of the drop. ``hashes``: the chunk's (reuses column hashes)."""
        self.report.rows_in += len(df)
        if df.empty:
            return df
        h = row_hashes(df, self._columns) if hashes is None else hashes.rows(self._columns, df.index)
        dup = self._seen.add_new(h)
        self.report.duplicates_removed += int(dup.sum())
        return df[~dup] if dup.any() else df

    def _must_drop(self, column: str, spec: ColumnSpec) -> bool:
        return (
            spec.missing == "drop"
            or spec.role in ("label", "id", "timestamp")
            or column in self.contract.row_key
        )

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        drop = np.zeros(len(df), dtype=bool)
        for column, spec in self.contract.columns.items():
            if spec.role == "ignore":
                continue
            missing = df[column].isna().to_numpy()
            n = int(missing.sum())
            if not n:
                continue
            if self._must_drop(column, spec):
                self.report._bump("rows_dropped_missing", column, n)
                drop |= missing
            else:
                self.report._bump("nulls_kept", column, n)
        # nulls kept in columns of rows that are dropped anyway are not "kept": correct the counts
        if drop.any():
            for column in list(self.report.nulls_kept):
                extra = int((df[column].isna().to_numpy() & drop).sum())
                if extra:
                    self.report.nulls_kept[column] -= extra
                    if not self.report.nulls_kept[column]:
                        del self.report.nulls_kept[column]
            df = df[~drop]
            self.report.rows_dropped += int(drop.sum())
        changed: dict[str, Any] = {}
        for column, spec in self.contract.columns.items():
            if spec.clip is None or spec.dtype not in ("int", "float"):
                continue
            lo, hi = spec.clip
            s = df[column]
            values = s.to_numpy(dtype="float64", na_value=np.nan)
            outside = (values < lo) | (values > hi)
            n = int(outside.sum())
            if n:
                self.report._bump("values_clipped", column, n)
                if spec.dtype == "int":
                    changed[column] = s.clip(int(np.ceil(lo)), int(np.floor(hi)))
                else:
                    changed[column] = s.clip(lo, hi)
        if changed:
            df = df.assign(**changed)
        self.report.rows_out += len(df)
        return df

    def close(self) -> None:
        """Free the duplicate-detection state (and its spill file on disk)."""
        self._seen.close()

    def process(self, df: pd.DataFrame) -> pd.DataFrame:
        """Deduplicate, apply the missing-value policies and clip one chunk (returns the cleaned chunk)."""
        return self.apply(self.drop_duplicates(df))
