"""split.holdout_mask: deterministic, stable across runs/platforms, independent of chunking and order."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pandas as pd

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.ingest.split import holdout_mask, key_hashes

BANKS = load_contract("banks")

# ---- an independent, pure-Python reference of what pandas computes (SipHash-2-4 → splitmix64 finalizer →
# hash_pandas_object's column combination). Matching it proves the split depends only on the key's bytes,
# not on the platform, the process or pandas internals we did not pin.
M = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & M


def _siphash24(key: bytes, data: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def half(a: int, b: int, c: int, d: int, s: int, t: int) -> None:
        v[a] = (v[a] + v[b]) & M
        v[b] = _rotl(v[b], s) ^ v[a]
        v[a] = _rotl(v[a], 32)
        v[c] = (v[c] + v[d]) & M
        v[d] = _rotl(v[d], t) ^ v[c]

    def rnd() -> None:
        half(0, 1, 2, 3, 13, 16)
        half(2, 1, 0, 3, 17, 21)

    n, end = len(data), len(data) - len(data) % 8
    for i in range(0, end, 8):
        m = struct.unpack_from("<Q", data, i)[0]
        v[3] ^= m
        rnd(), rnd()
        v[0] ^= m
    b = (n & 0xFF) << 56
    for i, byte in enumerate(data[end:]):
        b |= byte << (8 * i)
    v[3] ^= b
    rnd(), rnd()
    v[0] ^= b
    v[2] ^= 0xFF
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _reference_hash(value: str, salt: str = "") -> int:
    key = hashlib.blake2b(f"lepton-split/{salt}".encode(), digest_size=8).hexdigest().encode()
    x = _siphash24(key, value.encode("utf-8"))
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M
    x ^= x >> 31
    return (((0x345678 ^ x) * 1000003) + 97531) & M


GOLDEN = {
    "c00001": 8749408475653289124,
    "c00002": 17131352560077689421,
    "p0001": 7875036098348668870,
    "a-e000000000": 14825672951718413447,
}


def test_hashes_match_golden_values_and_the_reference_implementation():
    df = pd.DataFrame({"id": list(GOLDEN)})
    got = key_hashes(df, ["id"]).tolist()
    assert got == list(GOLDEN.values())
    for value, h in GOLDEN.items():
        assert _reference_hash(value) == h
    assert key_hashes(df, ["id"], salt="exp1").tolist() == [_reference_hash(v, "exp1") for v in GOLDEN]
    for value in ["", "é", "a longer key with more than sixteen bytes", "=cmd|' /C calc'!A0"]:
        assert key_hashes(pd.DataFrame({"id": [value]}), ["id"]).tolist() == [_reference_hash(value)]


def test_dtype_of_the_key_does_not_matter():
    ids = ["c1", "c2", "c3"]
    a = key_hashes(pd.DataFrame({"id": pd.Series(ids, dtype="str")}), ["id"])
    b = key_hashes(pd.DataFrame({"id": pd.Series(ids, dtype=object)}), ["id"])
    assert a.tolist() == b.tolist()
    ints_typed = key_hashes(pd.DataFrame({"k": pd.Series([1, 22, None], dtype="Int64")}), ["k"])
    ints_text = key_hashes(pd.DataFrame({"k": pd.Series(["1", "22", None], dtype="str")}), ["k"])
    assert ints_typed.tolist() == ints_text.tolist()


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"customer_id": [f"c{i:05d}" for i in range(n)], "balance": np.arange(n, dtype=float)}
    )


def test_fraction_is_close_to_the_contract():
    mask = holdout_mask(_frame(20_000), BANKS)
    assert mask.dtype == bool and abs(mask.mean() - BANKS.holdout_fraction) < 0.01


def test_same_rows_same_split_regardless_of_order_and_chunking():
    df = _frame(5000)
    whole = pd.Series(holdout_mask(df, BANKS), index=df["customer_id"])
    shuffled = df.sample(frac=1.0, random_state=3)
    again = pd.Series(holdout_mask(shuffled, BANKS), index=shuffled["customer_id"])
    assert whole.equals(again.loc[whole.index])
    chunked = np.concatenate([holdout_mask(df.iloc[i : i + 333], BANKS) for i in range(0, len(df), 333)])
    assert (chunked == whole.to_numpy()).all()
    # other columns do not matter: only the row key
    assert (holdout_mask(df.assign(balance=-1.0), BANKS) == whole.to_numpy()).all()


def test_salt_changes_the_split():
    df = _frame(5000)
    a, b = holdout_mask(df, BANKS), holdout_mask(df, BANKS, salt="experiment-2")
    assert 0.2 < (a != b).mean() < 0.5


def test_multi_column_key_and_empty_frame():
    c = Contract.model_validate(
        {
            "name": "t",
            "version": 1,
            "label": "y",
            "positive_label": "1",
            "row_key": ["a", "b"],
            "holdout_fraction": 0.5,
            "columns": {
                "a": {"dtype": "string", "role": "id", "unique": True},
                "b": {"dtype": "int", "role": "id", "unique": True},
                "y": {"dtype": "category", "role": "label"},
            },
            "model": {"kind": "mlp"},
        }
    )
    df = pd.DataFrame({"a": ["x"] * 1000, "b": pd.Series(range(1000), dtype="Int64"), "y": ["1"] * 1000})
    mask = holdout_mask(df, c)
    assert 0.4 < mask.mean() < 0.6
    assert holdout_mask(df.iloc[:0], c).shape == (0,)
