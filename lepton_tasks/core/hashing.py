"""Stable 64-bit hashes of DataFrame columns and rows: one implementation for dedupe, uniqueness, the split.

Every hash here is exactly ``pandas.util.hash_pandas_object(..., index=False, hash_key=key)`` — SipHash-2-4
of each value with a 16-byte key, then pandas' column combination — so it depends only on the values, not on
the process or the chunking (``tests/unit/test_hashing.py`` checks the equality; the split's golden values in
``tests/unit/test_split.py`` check it against an independent pure-Python SipHash).

Why not just call pandas: for an Arrow-backed string column pandas factorizes a Python-object copy of it
before hashing (~0.39 s per million 12-character ids on this machine). :func:`column_hash` instead hashes
Arrow's dictionary when a sample says the column repeats (categories, item ids, user ids: ~0.01–0.04 s per
million) and the values otherwise, fed to SipHash as UTF-8 ``bytes`` (~0.06 s per million) — same result.

:class:`ChunkHashes` computes each column's hash once per chunk and serves the row hash (exact-duplicate
removal), a column's hash (``unique`` across the drop) and the row-key hash (the train/holdout split) from it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.core.util.hashing import combine_hash_arrays

__all__ = ["ChunkHashes", "SeenHashes", "column_hash", "combine", "row_hashes", "split_hash_key"]

#: a sample this large decides whether hashing a string column's Arrow dictionary pays off
_SAMPLE = 8192


def split_hash_key(salt: str = "") -> str:
    """The 16-character SipHash key for ``salt`` (``hash_pandas_object`` requires exactly 16 bytes)."""
    return hashlib.blake2b(f"lepton-split/{salt}".encode(), digest_size=8).hexdigest()


def _is_string(s: pd.Series) -> bool:
    return isinstance(s.dtype, pd.StringDtype) or s.dtype == object


def _repetitive(arr: pa.Array) -> bool:
    """Whether ``arr`` likely holds fewer than ``len(arr) / 2`` distinct values (then hashing its dictionary
    pays off). Estimated from an evenly spaced sample of ``_SAMPLE`` values by the birthday bound: ``n``
    draws from ``D`` equally likely values repeat about ``n² / 2D`` times, so ``D ≈ n² / (2 · repeats)``.
    (Counting the sample's distinct values alone cannot tell 90 k distinct ids in 500 k rows from all-unique.)
    """
    n = min(len(arr), _SAMPLE)
    sample = arr.take(np.linspace(0, len(arr) - 1, n).astype(np.int64)) if len(arr) > n else arr
    repeats: int = n - pc.count_distinct(sample, mode="all").as_py()
    return repeats > 0 and n * n / (2 * repeats) < len(arr) / 2


def _as_bytes_objects(arr: pa.Array) -> np.ndarray:
    """The values as an object array of UTF-8 ``bytes``: pandas hashes ``bytes`` without encoding each ``str``
    first (same SipHash input, so the same hashes; ~3.5x faster on 12-character ids)."""
    binary = pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary()
    out: np.ndarray = arr.cast(binary).to_numpy(zero_copy_only=False)
    return out


def _string_hash(s: pd.Series, hash_key: str) -> np.ndarray | None:
    """Hash a string column through Arrow; ``None`` when it is not plain strings (then pandas does it)."""
    try:
        arr = pa.array(s, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # an object column of mixed types
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) or len(arr) == 0:
        return None
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if _repetitive(arr):  # hash each distinct value once
        enc = pc.dictionary_encode(arr)
        words = _as_bytes_objects(enc.dictionary)
        hashed = pd.util.hash_array(words, hash_key=hash_key, categorize=False)
        out = hashed[enc.indices.fill_null(0).to_numpy()]
    else:
        values = _as_bytes_objects(arr)
        if nulls is not None:
            values[nulls] = np.nan
        out = pd.util.hash_array(values, hash_key=hash_key, categorize=False)
    if nulls is not None:  # what pandas hashes for a missing string (its NA value, NaN)
        out[nulls] = pd.util.hash_array(np.array([np.nan], dtype=object), hash_key=hash_key)[0]
    return np.asarray(out, dtype=np.uint64)


def column_hash(s: pd.Series, hash_key: str) -> np.ndarray:
    """``hash_pandas_object(s, index=False, hash_key=hash_key)`` as a uint64 array, fast for strings."""
    if _is_string(s):
        out = _string_hash(s, hash_key)
        if out is not None:
            return out
    hashed = pd.util.hash_pandas_object(s, index=False, hash_key=hash_key)
    return np.asarray(hashed.to_numpy(dtype=np.uint64))


def combine(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Combine per-column hashes into one per row, as ``hash_pandas_object`` does for a DataFrame."""
    return np.asarray(combine_hash_arrays(iter(arrays), len(arrays)), dtype=np.uint64)


def row_hashes(df: pd.DataFrame, columns: Iterable[str] | None = None, *, hash_key: str) -> np.ndarray:
    """``hash_pandas_object(df[columns], index=False, hash_key=hash_key)`` as a uint64 array."""
    cols = list(df.columns if columns is None else columns)
    return combine([column_hash(df[c], hash_key) for c in cols])


class ChunkHashes:
    """Per-column hashes of ONE chunk, each computed at most once, looked up by the chunk's index labels.

    Later steps filter the chunk (duplicates, missing values) but keep its index labels, so
    ``hashes.rows(filtered.index)`` returns the hashes of exactly the rows still there.
    """

    def __init__(self, df: pd.DataFrame, *, salt: str = "") -> None:
        self._df = df
        self.hash_key = split_hash_key(salt)
        self._columns: dict[str, np.ndarray] = {}
        self._index = df.index

    def _positions(self, labels: pd.Index | None) -> np.ndarray | slice:
        if labels is None or labels is self._index or labels.equals(self._index):
            return slice(None)
        pos: np.ndarray = self._index.get_indexer(labels)
        if (pos < 0).any():
            raise KeyError("ChunkHashes: rows that are not in the chunk it was built from")
        return pos

    def column(self, name: str, labels: pd.Index | None = None) -> np.ndarray:
        """The hash of each value of column ``name`` (a *canonical string* hash for string columns)."""
        if name not in self._columns:
            self._columns[name] = column_hash(self._df[name], self.hash_key)
        return self._columns[name][self._positions(labels)]

    def rows(self, columns: Sequence[str], labels: pd.Index | None = None) -> np.ndarray:
        """The hash of each row's values in ``columns`` (equal rows, equal hashes)."""
        pos = self._positions(labels)
        return combine([self.column(c)[pos] for c in columns])


class SeenHashes:
    """The set of uint64 hashes seen so far in one drop, in bounded memory (exact; spills to disk).

    Exact-duplicate removal and ``unique`` columns need every earlier row's hash, which grows with the file
    (8 bytes per row). To keep the ingest's peak memory flat, this set holds at most ``memory_items`` hashes
    in RAM (a sorted array) and the rest in sorted run files on local disk (``tmp_dir``): each time RAM fills
    it becomes a new run, and runs of similar size are merged (streaming, on a background thread), so there
    are O(log n) runs and each hash is rewritten O(log n) times. In front of the runs stand

    * a fixed-size blocked Bloom filter (``bloom_bytes``; 6 bits in one 64-bit word per hash): a hash that
      was never added is rejected without touching disk, except for a small false-positive rate (measured
      by ``tests/unit/test_hashing.py``) that grows with the number of hashes per word;
    * a fence index (every ``BLOCK``-th hash of the run, 8 bytes per 512 hashes): a hash that passed the
      filter costs one 4 KiB ``pread`` per run until found.

    ``contains``, ``add`` and ``add_new`` take whole arrays (vectorized). 64-bit hashes make a false "seen"
    possible but negligible (≈ n²/2⁶⁵: 3·10⁻⁶ for 10 million rows). Call :meth:`close` (or use ``with``) to
    delete the runs.
    """

    BLOCK = 512  # hashes per fence / per disk read (4 KiB)
    PROBES = 6

    def __init__(
        self, *, memory_items: int = 2_000_000, bloom_bytes: int = 64 << 20, tmp_dir: str | None = None
    ) -> None:
        self._mem = np.empty(0, dtype=np.uint64)
        self._memory_items = memory_items
        self._bloom_bytes = bloom_bytes
        self._bloom_bits = 0
        self._bloom: np.ndarray | None = (
            None  # uint64 words, allocated at the first spill (small drops: never)
        )
        self._tmp_dir = tmp_dir
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._runs: list[_Run] = []  # oldest (largest) first; disjoint
        self._run_seq = 0
        self._pool: ThreadPoolExecutor | None = None  # merges runs in the background
        self._merging: tuple[int, Future[_Run]] | None = None  # (index of the first of the two runs, result)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the run files (the set is empty afterwards)."""
        if self._merging is not None:
            self._merging[1].exception()  # wait; its error no longer matters: the runs are being deleted
            self._merging = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self._runs = []
        self._mem = np.empty(0, dtype=np.uint64)
        self._bloom = None
        self._count = 0

    @property
    def spilled(self) -> int:
        """How many hashes live in run files on disk."""
        return sum(r.length for r in self._runs)

    # ------------------------------------------------------------------------------------------ bloom
    # A blocked Bloom filter: each hash picks one 64-bit word (its HIGH bits) and sets PROBES bits in it
    # (6-bit fields of the low bits). Word = high bits means ascending hashes touch the filter in ascending
    # order (cache- and prefetch-friendly), and hashes sharing a word are adjacent, so an insert ORs their
    # masks together (``reduceat``) and writes each word once, vectorized, without ``ufunc.at``.

    def _word_and_mask(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._bloom is not None
        # 2**_bloom_bits words; intp indices, because fancy indexing converts uint64 ones first (~1.7x slower)
        words = (hashes >> np.uint64(64 - self._bloom_bits)).astype(np.intp)
        masks = np.zeros(len(hashes), dtype=np.uint64)
        bit = np.empty(len(hashes), dtype=np.uint64)
        for k in range(self.PROBES):  # in place: no temporaries per probe
            np.right_shift(hashes, np.uint64(6 * k), out=bit)
            np.bitwise_and(bit, np.uint64(63), out=bit)
            np.left_shift(np.uint64(1), bit, out=bit)
            np.bitwise_or(masks, bit, out=masks)
        return words, masks

    def _bloom_add(self, hashes: np.ndarray) -> None:
        """Add ``hashes`` (ascending) to the filter."""
        if self._bloom is None or not len(hashes):
            return
        words, masks = self._word_and_mask(hashes)
        starts = np.flatnonzero(np.concatenate(([True], words[1:] != words[:-1])))
        self._bloom[words[starts]] |= np.bitwise_or.reduceat(masks, starts)

    def _bloom_maybe(self, hashes: np.ndarray) -> np.ndarray:
        assert self._bloom is not None
        words, masks = self._word_and_mask(hashes)
        maybe: np.ndarray = (self._bloom[words] & masks) == masks
        return maybe

    # ------------------------------------------------------------------------------------------- disk

    def _in_runs(self, hashes: np.ndarray) -> np.ndarray:
        """Exact membership in the run files for ``hashes`` (sorted ascending)."""
        out = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            todo = np.flatnonzero(~out)
            if not len(todo):
                break
            out[todo] = run.contains(hashes[todo])
        return out

    def _new_run_path(self) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lepton-seen-", dir=self._tmp_dir)
        self._run_seq += 1
        return os.path.join(self._dir.name, f"run-{self._run_seq:06d}.u64")

    def _spill(self) -> None:
        """Write the in-memory hashes as a new sorted run; merge runs of similar size in the background."""
        if self._bloom is None:  # first spill: from now on the filter covers every hash of the set
            self._bloom_bits = min(28, max(1, (self._bloom_bytes // 8).bit_length() - 1))  # 2**bits words
            self._bloom = np.zeros(1 << self._bloom_bits, dtype=np.uint64)
            self._bloom_add(self._mem)
        with _RunWriter(self._new_run_path(), self.BLOCK) as w:
            w.emit(self._mem)
        self._runs.append(w.run())
        self._mem = np.empty(0, dtype=np.uint64)
        self._maintain()

    def _maintain(self, wait: bool = False) -> None:
        """Install a finished background merge, then start the next one that is due.

        Runs are merged pairwise when the older is at most twice the newer (a binary counter: O(log n) runs,
        each hash rewritten O(log n) times). A merge runs on a worker thread (numpy sorts and file I/O release
        the GIL) while lookups keep using its two inputs, which are replaced and deleted once it is done.
        """
        if self._merging is not None:
            i, fut = self._merging
            if not (wait or fut.done()):
                return
            merged = fut.result()  # a merge error (e.g. disk full) surfaces here
            old = self._runs[i : i + 2]
            self._runs[i : i + 2] = [merged]
            self._merging = None
            for run in old:
                os.unlink(run.path)
        for i in range(len(self._runs) - 2, -1, -1):  # the newest due pair first
            a, b = self._runs[i], self._runs[i + 1]
            if a.length <= 2 * b.length:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="lepton-seen-merge")
                self._merging = (i, self._pool.submit(_merge_runs, a, b, self._new_run_path(), self.BLOCK))
                break

    # -------------------------------------------------------------------------------------------- API

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean array: which of ``hashes`` were added before (exact)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        out = np.zeros(len(hashes), dtype=bool)
        if not self._count or not len(hashes):
            return out
        order = np.argsort(hashes)
        out[order] = self._contains_sorted(hashes[order])
        return out

    def _contains_sorted(self, probe: np.ndarray) -> np.ndarray:
        """``contains`` for ascending ``probe``: cache-friendly binary searches, disk blocks in file order."""
        if not self._count or not len(probe):
            return np.zeros(len(probe), dtype=bool)
        if len(self._mem):
            pos = np.minimum(np.searchsorted(self._mem, probe), len(self._mem) - 1)
            found: np.ndarray = self._mem[pos] == probe
        else:
            found = np.zeros(len(probe), dtype=bool)
        if self._runs:
            idx = np.flatnonzero(~found)
            idx = idx[self._bloom_maybe(probe[idx])]
            found[idx] = self._in_runs(probe[idx])
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Add ``hashes`` (duplicates and already-present values are ignored)."""
        self.add_new(hashes)

    def add_new(self, hashes: np.ndarray, *, within: bool = True) -> np.ndarray:
        """Add ``hashes``; return which of them were already there — added before, or (``within``) equal to
        an earlier element of ``hashes`` itself (like ``pandas.Series.duplicated(keep="first")`` over the
        whole history). With ``within=False`` only hashes added by earlier calls count.

        One membership test per distinct hash: the cheap way to ask ``contains`` and then ``add``.
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        dup = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return dup
        self._maintain()
        order = np.argsort(hashes)  # not stable (SIMD sort): the first of equal hashes is found below
        ordered = hashes[order]
        first = np.ones(len(ordered), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        starts = np.flatnonzero(first)
        distinct = ordered[starts]
        seen = self._contains_sorted(distinct)
        if within:  # all repeats are duplicates, and the earliest of each group is one iff it was seen
            dup[:] = True
            earliest = np.minimum.reduceat(order, starts)
            dup[earliest[~seen]] = False
        else:  # every element of a group of equal hashes gets its group's answer
            dup[order] = seen[np.cumsum(first) - 1]
        new = distinct[~seen]
        if len(new):
            self._bloom_add(new)
            merged = np.concatenate([self._mem, new])
            merged.sort(kind="stable")  # two sorted runs: linear
            self._mem = merged
            self._count += len(new)
            if len(self._mem) >= self._memory_items:
                self._spill()
        return dup


class _Run:
    """One sorted run file of distinct hashes, with its fence index (every ``block``-th hash)."""

    def __init__(self, path: str, length: int, fences: np.ndarray, block: int) -> None:
        self.path, self.length, self.fences, self.block = path, length, fences, block

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Exact membership for ``hashes`` (ascending): one ``pread`` per distinct block touched."""
        out = np.zeros(len(hashes), dtype=bool)
        if not self.length or not len(hashes):
            return out
        block = np.searchsorted(self.fences, hashes, side="right") - 1
        ok = block >= 0  # below the smallest hash of the run: not there
        with open(self.path, "rb") as f:
            fd = f.fileno()
            for b in np.unique(block[ok]):
                start = int(b) * self.block
                n = min(self.block, self.length - start)
                data = np.frombuffer(os.pread(fd, n * 8, start * 8), dtype=np.uint64)
                sel = np.flatnonzero(block == b)
                pos = np.minimum(np.searchsorted(data, hashes[sel]), n - 1)
                out[sel] = data[pos] == hashes[sel]
        return out

    def blocks(self, step: int) -> Iterator[np.ndarray]:
        """The run's hashes in ascending order, ``step`` at a time."""
        with open(self.path, "rb") as f:
            while len(chunk := np.fromfile(f, dtype=np.uint64, count=step)):
                yield chunk


class _RunWriter:
    """Writes ascending arrays to a new run file and collects its fences."""

    def __init__(self, path: str, block: int) -> None:
        self.path, self.block = path, block
        self._f = open(path, "wb")  # noqa: SIM115 - closed by __exit__
        self._fences: list[np.ndarray] = []
        self._written = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def emit(self, arr: np.ndarray) -> None:
        first = (-self._written) % self.block  # index in arr of the next fence
        self._fences.append(arr[first :: self.block].copy())  # a copy: a view would keep all of arr alive
        arr.tofile(self._f)
        self._written += len(arr)

    def run(self) -> _Run:
        fences = np.concatenate(self._fences) if self._fences else np.empty(0, dtype=np.uint64)
        return _Run(self.path, self._written, fences, self.block)


def _merge_runs(a: _Run, b: _Run, path: str, block: int, step: int = 1 << 18) -> _Run:
    """Merge two disjoint sorted runs into a new one at ``path`` (streaming: ~2 × ``step`` hashes in RAM).
    The inputs are left in place (lookups may still be reading them)."""
    ia, ib = a.blocks(step), b.blocks(step)
    buf_a = next(ia, np.empty(0, dtype=np.uint64))
    buf_b = next(ib, np.empty(0, dtype=np.uint64))
    with _RunWriter(path, block) as w:
        while len(buf_a) and len(buf_b):
            limit = min(buf_a[-1], buf_b[-1])  # everything up to here is final; one buffer is used up
            ja = int(np.searchsorted(buf_a, limit, side="right"))
            jb = int(np.searchsorted(buf_b, limit, side="right"))
            merged = np.concatenate([buf_a[:ja], buf_b[:jb]])
            merged.sort(kind="stable")  # two sorted runs: a linear merge
            w.emit(merged)
            buf_a, buf_b = buf_a[ja:], buf_b[jb:]
            if not len(buf_a):
                buf_a = next(ia, buf_a)
            if not len(buf_b):
                buf_b = next(ib, buf_b)
        for rest, it in ((buf_a, ia), (buf_b, ib)):
            while len(rest):
                w.emit(rest)
                rest = next(it, np.empty(0, dtype=np.uint64))
    return w.run()
