"""Weight updates on the wire: numpy arrays + meta ↔ bytes, without pickle."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest

from lepton_tasks.core import weights


def _arrays():
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.normal(size=(5,)),  # float64
        np.array(2.5, dtype=np.float16),  # 0-d
        np.zeros((0, 7), dtype=np.float32),  # empty
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([True, False]),
        np.arange(4, dtype=np.uint8),
        np.arange(3, dtype=">f4"),  # big-endian stays big-endian
    ]


def test_round_trip_keeps_dtype_shape_values_and_meta():
    arrays = _arrays()
    meta = {"partner": "bank-a", "round": 3, "n_samples": 812, "metrics": {"auc": 0.93, "notes": []}}
    out, got_meta = weights.loads(weights.dumps(arrays, meta))
    assert got_meta == meta
    assert len(out) == len(arrays)
    for a, b in zip(arrays, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_empty_list_and_no_meta():
    out, meta = weights.loads(weights.dumps([]))
    assert out == [] and meta == {}


def test_dumps_rejects_object_and_string_arrays_and_bad_meta():
    with pytest.raises(ValueError, match="dtype object"):
        weights.dumps([np.array([{"a": 1}], dtype=object)])
    with pytest.raises(ValueError, match="only bool/int/float"):
        weights.dumps([np.array(["x"])])
    with pytest.raises(ValueError, match="reserved"):
        weights.dumps([], {"arrays": []})
    with pytest.raises(ValueError, match="JSON"):
        weights.dumps([], {"when": object()})


def _archive(members: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)  # np.savez pickles object arrays
    return buf.getvalue()


def _meta(specs) -> np.ndarray:
    record = {"format": weights.FORMAT, "format_version": weights.FORMAT_VERSION, "arrays": specs}
    return np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)


def test_loads_refuses_a_pickled_object_array():
    evil = np.array([{"__reduce__": "boom"}], dtype=object)
    data = _archive({"a00000": evil, "__meta__": _meta([{"dtype": "|O", "shape": [1]}])})
    with pytest.raises(ValueError, match="pickle"):
        weights.loads(data)


def test_loads_refuses_a_raw_pickle_and_garbage():
    with pytest.raises(ValueError, match="not a weights archive"):
        weights.loads(pickle.dumps([np.zeros(3)]))
    with pytest.raises(ValueError, match="not a weights archive"):
        weights.loads(b"")
    with pytest.raises(TypeError):
        weights.loads("not bytes")  # type: ignore[arg-type]


def test_loads_checks_arrays_against_the_meta():
    f64 = np.zeros(3)
    with pytest.raises(ValueError, match="meta says <f4"):
        weights.loads(_archive({"a00000": f64, "__meta__": _meta([{"dtype": "<f4", "shape": [3]}])}))
    with pytest.raises(ValueError, match=r"meta says <f8\[4\]"):
        weights.loads(_archive({"a00000": f64, "__meta__": _meta([{"dtype": "<f8", "shape": [4]}])}))
    with pytest.raises(ValueError, match="do not match the meta"):
        weights.loads(
            _archive({"a00000": f64, "a00001": f64, "__meta__": _meta([{"dtype": "<f8", "shape": [3]}])})
        )
    with pytest.raises(ValueError, match="no meta record"):
        weights.loads(_archive({"a00000": f64}))


def test_loads_rejects_other_format_versions():
    record = {"format": weights.FORMAT, "format_version": 99, "arrays": []}
    data = _archive({"__meta__": np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)})
    with pytest.raises(ValueError, match="version 99"):
        weights.loads(data)


def test_sha256_and_fingerprint():
    assert weights.sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    arrays = _arrays()
    copy = [a.copy() for a in arrays]
    assert weights.fingerprint(arrays) == weights.fingerprint(copy)
    # byte order does not matter, dtype/shape/values do
    assert weights.fingerprint([np.arange(3, dtype=">f4")]) == weights.fingerprint(
        [np.arange(3, dtype="<f4")]
    )
    assert weights.fingerprint([np.arange(3, dtype="f4")]) != weights.fingerprint([np.arange(3, dtype="f8")])
    assert weights.fingerprint([np.zeros((2, 3))]) != weights.fingerprint([np.zeros((3, 2))])
    assert weights.fingerprint([np.zeros(2)]) != weights.fingerprint([np.zeros(1), np.zeros(1)])
    assert weights.fingerprint([np.array(1.0)]) != weights.fingerprint([np.array([1.0])])
    out, _ = weights.loads(weights.dumps(arrays))
    assert weights.fingerprint(out) == weights.fingerprint(arrays)
