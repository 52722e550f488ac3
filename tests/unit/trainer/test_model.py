"""Model construction (both kinds) and model-ready frame → model inputs."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import ModelSpec
from lepton_tasks.trainer import data
from lepton_tasks.trainer.model import build_model, configure_devices, sequence_feature_width

SEQ = ModelSpec(
    kind="sequence",
    hidden=[8],
    user_column="user_id",
    item_column="item_id",
    timestamp_column="ts",
    sequence_length=3,
    hash_buckets=64,
    embedding_dim=4,
    gru_units=5,
)
MLP = ModelSpec(kind="mlp", hidden=[6, 4], dropout=0.1, l2=1e-4)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


def _seq_batch(n=4, length=3, width=3, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 64, size=(n, length)).astype(np.int32)
    return {
        "items": items,
        "features": rng.normal(size=(n, length, width)).astype(np.float32),
        "item": items[:, -1].copy(),
        "user": rng.integers(1, 64, size=n).astype(np.int32),
    }


# ------------------------------------------------------------------------------------------------ model
def test_configure_devices_is_a_noop_on_cpu():
    assert isinstance(configure_devices(), list)


def test_mlp_shapes_and_deterministic_init():
    model = build_model(MLP, n_features=5, seed=7)
    assert [tuple(w.shape) for w in model.get_weights()] == [(5, 6), (6,), (6, 4), (4,), (4, 1), (1,)]
    out = np.asarray(model(np.zeros((3, 5), np.float32)))
    assert out.shape == (3, 1) and ((out > 0) & (out < 1)).all()
    assert _same(model.get_weights(), build_model(MLP, 5, seed=7).get_weights())
    assert not _same(model.get_weights(), build_model(MLP, 5, seed=8).get_weights())


def test_sequence_shapes_and_deterministic_init():
    model = build_model(SEQ, n_features=2, seed=3)
    assert sorted(model.input) == ["features", "item", "items", "user"]
    width = sequence_feature_width(2)
    out = np.asarray(model(_seq_batch(width=width)))
    assert out.shape == (4, 1) and ((out > 0) & (out < 1)).all()
    shapes = [tuple(w.shape) for w in model.get_weights()]
    assert (64, 4) in shapes  # hashed item and user embedding tables
    assert _same(model.get_weights(), build_model(SEQ, 2, seed=3).get_weights())
    assert not _same(model.get_weights(), build_model(SEQ, 2, seed=4).get_weights())


def test_sequence_padding_is_masked():
    model = build_model(SEQ, n_features=2, seed=0)
    batch = _seq_batch(n=2, width=sequence_feature_width(2))
    batch["items"][:, 2] = 0  # last step is padding
    base = np.asarray(model(batch))
    noisy = {k: v.copy() for k, v in batch.items()}
    noisy["features"][:, 2, :] = 99.0  # garbage in padded steps must not matter
    np.testing.assert_allclose(np.asarray(model(noisy)), base, rtol=1e-6)
    real = {k: v.copy() for k, v in batch.items()}
    real["items"][:, 2] = 5  # …but a real event there does
    assert not np.allclose(np.asarray(model(real)), base)


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="user_column"):
        build_model(ModelSpec(kind="sequence"), 2, 0)
    with pytest.raises(ValueError, match="hash_buckets"):
        build_model(SEQ.model_copy(update={"hash_buckets": 1}), 2, 0)
    with pytest.raises(ValueError, match="at least one feature"):
        build_model(MLP, 0, 0)
    with pytest.raises(ValueError, match="dropout"):
        build_model(MLP.model_copy(update={"dropout": 1.0}), 3, 0)


# ------------------------------------------------------------------------------------------------ data
def test_hash_ids_is_stable_and_in_range():
    ids = ["u1", "u2", "item-42", "u1"]
    h = data.hash_ids(ids, 1000)
    assert h.dtype == np.int32 and h[0] == h[3]
    # pinned: the same buckets on every machine and in every process (a change breaks federated models)
    assert h.tolist() == GOLDEN_HASHES
    big = data.hash_ids([f"id{i}" for i in range(5000)], 7)
    assert big.min() == 1 and big.max() == 6  # 0 is reserved for padding
    assert data.hash_ids(pd.Series([1, 2]), 50).tolist() == data.hash_ids(["1", "2"], 50).tolist()
    with pytest.raises(ValueError, match="missing"):
        data.hash_ids(["a", None], 10)


GOLDEN_HASHES = [487, 471, 874, 487]  # pandas SipHash-2-4, key "0123456789123456", mod 999, + 1


def _events() -> pd.DataFrame:
    # rows deliberately out of order; user b has two events at the same timestamp (tie-break on event_id)
    return pd.DataFrame(
        {
            "event_id": ["e5", "e1", "e3", "e2", "e4", "e6"],
            "user_id": ["b", "a", "a", "a", "b", "b"],
            "item_id": ["i5", "i1", "i3", "i2", "i4", "i6"],
            "ts": np.array([20, 1, 3, 2, 20, 30], dtype=np.int64),
            "price": np.array([5, 1, 3, 2, 4, 6], dtype=np.float32),
            "label": np.array([1, 0, 1, 1, 0, 0], dtype=np.int8),
        }
    )


def test_sequence_windows_are_per_user_ordered_and_right_padded():
    frame = _events()
    x, y = data.to_model_inputs(frame, SEQ, ["price"])
    assert y.tolist() == [1, 0, 1, 1, 0, 0]  # frame order kept
    assert x["items"].shape == (6, 3) and x["features"].shape == (6, 3, 1 + len(data.EXTRA_CHANNELS))
    h = dict(zip(frame["item_id"], data.hash_ids(frame["item_id"], SEQ.hash_buckets), strict=True))
    expected_items = {  # oldest first, up to and including the row's own event
        "e1": ["i1"],
        "e2": ["i1", "i2"],
        "e3": ["i1", "i2", "i3"],
        "e4": ["i4"],
        "e5": ["i4", "i5"],  # same ts as e4: e4 < e5 by event_id
        "e6": ["i4", "i5", "i6"],
    }
    expected_prev_label = {"e1": [0], "e2": [0, 0], "e3": [0, 0, 1], "e4": [0], "e5": [0, 0], "e6": [0, 0, 1]}
    for row, event in enumerate(frame["event_id"]):
        want = [h[i] for i in expected_items[event]]
        pad = 3 - len(want)
        assert x["items"][row].tolist() == want + [0] * pad, event
        prices = [float(i[1:]) for i in expected_items[event]]
        assert x["features"][row, :, 0].tolist() == prices + [0.0] * pad, event
        assert x["features"][row, :, 1].tolist() == expected_prev_label[event] + [0.0] * pad, event
        assert x["features"][row, :, 2].tolist() == [0.0] * 3, event  # no repeat views here
        assert x["item"][row] == h[frame["item_id"][row]]
    assert x["user"][1] == x["user"][2] != x["user"][0]


def test_sequence_window_keeps_only_the_last_events_and_ties_break_by_position():
    frame = pd.DataFrame(
        {"user_id": ["u"] * 5, "item_id": list("abcde"), "ts": [9, 9, 9, 9, 9], "label": [0, 1, 0, 1, 0]}
    )
    x, _ = data.to_model_inputs(frame, SEQ, [])
    h = data.hash_ids(list("abcde"), SEQ.hash_buckets)
    assert x["items"][4].tolist() == h[2:5].tolist()
    assert x["features"].shape == (5, 3, 2)
    assert x["features"][4, :, 0].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="tie-break"):
        data.to_model_inputs(frame, SEQ, [], tie_break=["nope"])


def test_sequence_inputs_are_vectorized_for_100k_rows():
    rng = np.random.default_rng(0)
    n = 100_000
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, 5000, n).astype(str),
            "item_id": rng.integers(0, 2000, n).astype(str),
            "ts": rng.integers(0, 10**6, n).astype(np.int64),
            "f0": rng.normal(size=n).astype(np.float32),
            "label": rng.integers(0, 2, n).astype(np.int8),
        }
    )
    spec = SEQ.model_copy(update={"sequence_length": 10})
    t = time.perf_counter()
    x, y = data.to_model_inputs(frame, spec, ["f0"])
    elapsed = time.perf_counter() - t
    assert x["items"].shape == (n, 10) and x["features"].shape == (n, 10, 3) and y.shape == (n,)
    assert elapsed < 10, elapsed
    # every window ends with the row's own event
    last = x["items"][np.arange(n), (x["items"] != 0).sum(axis=1) - 1]
    np.testing.assert_array_equal(last, x["item"])


def test_mlp_inputs_and_frame_errors():
    frame = pd.DataFrame(
        {
            "a": np.array([1, 2], np.float32),
            "b": np.array([3, 4], np.float32),
            "label": np.array([0, 1], np.int8),
        }
    )
    x, y = data.to_model_inputs(frame, MLP, ["b", "a"])
    assert x.dtype == np.float32 and x.tolist() == [[3, 1], [4, 2]] and y.tolist() == [0, 1]
    x, y = data.to_model_inputs(frame.drop(columns="label"), MLP, ["a"])
    assert y is None
    with pytest.raises(ValueError, match="lacks feature columns"):
        data.to_model_inputs(frame, MLP, ["a", "zz"])
    with pytest.raises(ValueError, match="NaN"):
        data.to_model_inputs(frame.assign(a=[np.nan, 1.0]), MLP, ["a"])
    with pytest.raises(ValueError, match="0/1"):
        data.to_model_inputs(frame.assign(label=[0, 2]), MLP, ["a"])
    with pytest.raises(ValueError, match="sequence columns"):
        data.to_model_inputs(frame, SEQ, ["a"])


@pytest.mark.slow
def test_initial_weights_are_identical_in_another_process():
    import os
    import subprocess
    import sys

    from lepton_tasks.core.weights import fingerprint

    code = (
        "from lepton_tasks.core.contracts import ModelSpec\n"
        "from lepton_tasks.trainer.model import build_model\n"
        "from lepton_tasks.core.weights import fingerprint\n"
        f"spec = ModelSpec.model_validate({SEQ.model_dump()!r})\n"
        "print(fingerprint(build_model(spec, 2, seed=9).get_weights()))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == fingerprint(build_model(SEQ, 2, seed=9).get_weights())


def test_repeat_views_are_flagged_and_targets_keep_full_histories():
    frame = pd.DataFrame(
        {
            "user_id": ["u"] * 4 + ["v"],
            "item_id": ["a", "b", "a", "a", "a"],
            "ts": np.array([1, 2, 3, 4, 1], dtype=np.int64),
            "label": np.array([0, 1, 0, 1, 0], dtype=np.int8),
        }
    )
    x, _ = data.to_model_inputs(frame, SEQ, [])
    same = x["features"][:, :, 1]
    assert same[0].tolist() == [0, 0, 0]  # its own event is not a repeat
    assert same[2].tolist() == [1, 0, 0]  # a, b, [a]
    assert same[3].tolist() == [0, 1, 0]  # b, a, [a]  (window of 3)
    assert same[4].tolist() == [0, 0, 0]  # another user's views do not count
    mask = np.array([False, False, True, False, True])
    xt, yt = data.to_model_inputs(frame, SEQ, [], targets=mask)
    assert yt.tolist() == [0, 0]
    for key in x:
        np.testing.assert_array_equal(xt[key], x[key][mask])
    xm, ym = data.to_model_inputs(frame.assign(f=np.float32(1)), MLP, ["f"], targets=mask)
    assert xm.shape == (2, 1) and ym.tolist() == [0, 0]
    with pytest.raises(ValueError, match="boolean"):
        data.to_model_inputs(frame, SEQ, [], targets=np.array([1, 0, 1, 0, 1]))
