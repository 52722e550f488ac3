"""Deterministic train/holdout split by a stable hash of the contract's ``row_key``.

A row is held out when ``hash(row_key values) / 2**64 < holdout_fraction``. The hash
(:mod:`lepton_tasks.core.hashing`) is pandas' ``hash_pandas_object`` — SipHash-2-4 of each value's UTF-8 bytes
with a fixed 16-byte key, combined across columns — which depends only on the values (not on the platform,
the process, ``PYTHONHASHSEED``, the row's position, the chunking or the order of rows). Key values are hashed
as their canonical *string* form so a key read from CSV (text) and from Parquet (typed) splits the same way.
Golden values in ``tests/unit/test_split.py`` pin the function: if a pandas upgrade ever changed it, the test
fails instead of silently moving rows between train and holdout (which would leak holdout rows into training
across drops).

``salt`` changes the split (e.g. per experiment); the empty salt is the default everyone uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.hashing import row_hashes, split_hash_key

if TYPE_CHECKING:
    from lepton_tasks.core.hashing import ChunkHashes

__all__ = ["holdout_mask", "key_hashes"]


def _canonical(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        ts = s if getattr(s.dtype, "tz", None) is not None else s.dt.tz_localize("UTC")
        return ts.dt.tz_convert("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").astype("str")
    if pd.api.types.is_float_dtype(s.dtype):
        return s.map(repr, na_action="ignore").astype("str")
    return s.astype("str")


def _is_canonical(s: pd.Series) -> bool:
    return isinstance(s.dtype, pd.StringDtype)


def key_hashes(
    df: pd.DataFrame, columns: list[str], *, salt: str = "", hashes: ChunkHashes | None = None
) -> np.ndarray:
    """Stable uint64 hash of each row's key columns (canonical string form).

    ``hashes`` (built from the chunk ``df`` was filtered from, with the same ``salt``) reuses the key columns'
    hashes already computed for dedupe/uniqueness when they are strings — the same values, computed once.
    """
    if (
        hashes is not None
        and hashes.hash_key == split_hash_key(salt)
        and all(_is_canonical(df[c]) for c in columns)
    ):
        return hashes.rows(columns, df.index)
    frame = pd.DataFrame({c: _canonical(df[c]).to_numpy() for c in columns})
    return row_hashes(frame, hash_key=split_hash_key(salt))


def holdout_mask(
    df: pd.DataFrame, contract: Contract, *, salt: str = "", hashes: ChunkHashes | None = None
) -> np.ndarray:
    """Boolean array: ``True`` for rows of the holdout split, ``False`` for training rows.

    Deterministic per row: the same key always lands in the same split, whatever the chunking or the order.
    """
    if df.empty:
        return np.zeros(0, dtype=bool)
    h = key_hashes(df, list(contract.row_key), salt=salt, hashes=hashes)
    threshold = np.uint64(min(int(contract.holdout_fraction * 2.0**64), 2**64 - 1))
    return h < threshold
