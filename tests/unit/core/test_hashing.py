"""hashing: column/row hashes equal pandas' hash_pandas_object; SeenHashes: an exact set spilling to disk."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.hashing import ChunkHashes, SeenHashes, column_hash, row_hashes, split_hash_key

KEY = split_hash_key("")


def _pandas(obj) -> list[int]:
    return pd.util.hash_pandas_object(obj, index=False, hash_key=KEY).to_numpy(dtype=np.uint64).tolist()


@pytest.mark.parametrize(
    "series",
    [
        pd.Series([f"id-{i}" for i in range(20_000)], dtype="str"),  # distinct: hashed directly
        pd.Series([f"cat-{i % 7}" for i in range(20_000)], dtype="str"),  # repetitive: via the dictionary
        pd.Series(["a", None, "b", None] * 5_000, dtype="str"),  # missing values, both paths
        pd.Series([f"u{i}" if i % 3 else None for i in range(20_000)], dtype="str"),
        pd.Series(["x", "é", "=cmd|' /C calc'!A0", ""], dtype=object),
        pd.Series(["1", 2, None], dtype=object),  # mixed objects: pandas does it
        pd.Series([], dtype="str"),
        pd.Series([1.5, np.nan, -0.0, 1e300]),
        pd.Series([1, None, 3], dtype="Int64"),
        pd.Series([True, None, False], dtype="boolean"),
        pd.Series(pd.to_datetime(["2024-01-01T00:00:00Z", None], utc=True)),
    ],
)
def test_column_hash_equals_pandas(series):
    assert column_hash(series, KEY).tolist() == _pandas(series)


def test_row_hashes_equal_pandas_dataframe_hash():
    df = pd.DataFrame(
        {
            "id": pd.Series([f"e{i}" for i in range(10_000)], dtype="str"),
            "cat": pd.Series([["a", "b", None][i % 3] for i in range(10_000)], dtype="str"),
            "x": np.arange(10_000) / 7,
        }
    )
    assert row_hashes(df, hash_key=KEY).tolist() == _pandas(df)
    assert row_hashes(df, ["cat", "x"], hash_key=KEY).tolist() == _pandas(df[["cat", "x"]])


def test_chunk_hashes_follow_index_labels_after_filtering():
    df = pd.DataFrame({"id": pd.Series([f"e{i}" for i in range(100)], dtype="str"), "x": np.arange(100.0)})
    h = ChunkHashes(df)
    kept = df[df["x"] % 3 == 0]
    assert h.column("id", kept.index).tolist() == column_hash(kept["id"], KEY).tolist()
    assert h.rows(["id", "x"], kept.index).tolist() == _pandas(kept)
    with pytest.raises(KeyError):
        h.column("id", pd.Index([1000]))


def test_seen_hashes_is_exact_across_spills(tmp_path):
    rng = np.random.default_rng(7)
    seen = SeenHashes(memory_items=1_000, bloom_bytes=4096, tmp_dir=str(tmp_path))  # tiny: many spills,
    truth: set[int] = set()  # and a Bloom filter so small that most probes reach the disk
    for _ in range(40):
        batch = rng.integers(0, 5_000, size=300).astype(np.uint64)  # small range: many repeats
        expected = np.array([int(v) in truth for v in batch])
        assert (seen.contains(batch) == expected).all()
        seen.add(batch)
        truth.update(int(v) for v in batch)
        assert len(seen) == len(truth)
    assert seen.spilled > 0  # the run file was used
    extremes = np.array([0, 2**64 - 1, 4_999, 5_000], dtype=np.uint64)
    assert seen.contains(extremes).tolist() == [int(v) in truth for v in extremes]
    while seen._merging is not None:  # let the background merges finish
        seen._maintain(wait=True)
    files = list(tmp_path.glob("lepton-seen-*/*.u64"))
    assert 1 <= len(files) == len(seen._runs) <= 4  # runs merged by size: O(log spills), not one per spill
    assert sum(os.path.getsize(f) for f in files) == seen.spilled * 8
    seen.close()
    assert not list(tmp_path.glob("lepton-seen-*"))
    assert len(seen) == 0 and not seen.contains(extremes).any()


def test_add_new_flags_repeats_like_pandas_duplicated_over_the_whole_history(tmp_path):
    rng = np.random.default_rng(3)
    seen = SeenHashes(memory_items=700, bloom_bytes=4096, tmp_dir=str(tmp_path))  # spills along the way
    history: list[int] = []
    for _ in range(30):
        batch = rng.integers(0, 4_000, size=250).astype(np.uint64)  # repeats within and across batches
        before = set(history)
        if rng.random() < 0.5:
            got = seen.add_new(batch)
            expected = pd.Series(history + batch.tolist()).duplicated(keep="first").to_numpy()[len(history) :]
        else:
            got = seen.add_new(batch, within=False)
            expected = np.array([int(v) in before for v in batch])
        assert got.tolist() == expected.tolist()
        history += batch.tolist()
        assert len(seen) == len(set(history))
    assert seen.spilled > 0
    assert not seen.add_new(np.empty(0, dtype=np.uint64)).size
    seen.close()


def test_seen_hashes_memory_is_bounded(tmp_path):
    """Past ``memory_items`` the hashes live on disk, not in RAM (the flat-memory property of the ingest)."""
    seen = SeenHashes(memory_items=50_000, bloom_bytes=1 << 20, tmp_dir=str(tmp_path))
    rng = np.random.default_rng(1)
    for _ in range(20):
        seen.add(rng.integers(0, 2**64 - 1, size=20_000, dtype=np.uint64))
    assert len(seen) == 400_000
    assert len(seen._mem) < 50_000 and seen.spilled >= 350_000
    # the Bloom filter keeps most never-seen probes off the disk (3 hashes per 64-bit word here)
    fresh = rng.integers(0, 2**64 - 1, size=100_000, dtype=np.uint64)
    assert seen._bloom_maybe(fresh).mean() < 0.01
    assert not seen.contains(fresh).any()
    seen.close()


def test_split_from_chunk_hashes_equals_the_plain_split():
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.ingest.split import holdout_mask

    ecommerce = load_contract("ecommerce")
    df = pd.DataFrame({"event_id": pd.Series([f"e{i}" for i in range(5_000)], dtype="str")})
    kept = df.iloc[::3]
    for salt in ("", "exp-2"):
        plain = holdout_mask(kept, ecommerce, salt=salt)
        shared = holdout_mask(kept, ecommerce, salt=salt, hashes=ChunkHashes(df, salt=salt))
        assert (plain == shared).all() and 0.1 < plain.mean() < 0.3
    # hashes built for another salt are not used for this one
    other = holdout_mask(kept, ecommerce, salt="exp-2", hashes=ChunkHashes(df, salt=""))
    assert (other == holdout_mask(kept, ecommerce, salt="exp-2")).all()


@pytest.mark.slow
def test_merging_runs_streams_instead_of_holding_the_run_in_ram(tmp_path):
    """A merge keeps O(step) hashes in RAM: the fence index must not keep views of every emitted block."""
    import tracemalloc

    from lepton_tasks.core.hashing import _merge_runs, _RunWriter

    rng = np.random.default_rng(5)
    values = np.unique(rng.integers(0, 2**64 - 1, size=2_000_000, dtype=np.uint64))
    runs = []
    for name, part in (("a", values[0::2]), ("b", values[1::2])):
        with _RunWriter(str(tmp_path / name), 512) as w:
            w.emit(part)
        runs.append(w.run())
    del values, part
    tracemalloc.start()
    merged = _merge_runs(runs[0], runs[1], str(tmp_path / "m"), 512, step=1 << 14)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert merged.length == runs[0].length + runs[1].length
    data = np.fromfile(tmp_path / "m", dtype=np.uint64)
    assert (np.diff(data) > 0).all() and (merged.fences == data[::512]).all()
    assert peak < 2 << 20  # 16 MB of hashes merged with ~1 MB in flight (a view per block held ~16 MB)
