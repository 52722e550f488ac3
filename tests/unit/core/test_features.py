"""normalize: federated sufficient statistics (merge == pooled), global stats and the model-ready frame."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.features import GlobalStats, SufficientStats, feature_names, merge, transform
from lepton_tasks.ingest.clean import coerce_types
from lepton_tasks.trainer.data import hash_ids

BANKS = load_contract("banks")


@pytest.fixture(scope="module")
def banks_typed() -> pd.DataFrame:
    from lepton_tasks.ops.scenarios.banks import load_default

    df = load_default().head(3000).copy()
    df.loc[df.index % 17 == 0, "income"] = np.nan  # income is nullable (policy: indicator)
    df.loc[df.index % 23 == 0, "student"] = None  # student is nullable (policy: mode)
    return coerce_types(df, BANKS, object_key="banks/x.csv")


def _assert_same(a: SufficientStats, b: SufficientStats) -> None:
    assert a.rows == b.rows and a.label_counts == b.label_counts
    for c in a.numeric:
        x, y = a.numeric[c], b.numeric[c]
        assert (x.count, x.null_count) == (y.count, y.null_count)
        assert np.allclose([x.sum, x.sum_sq], [y.sum, y.sum_sq], rtol=1e-12)
    for c in a.categorical:
        assert a.categorical[c] == b.categorical[c]
    ga, gb = GlobalStats.from_stats(a, BANKS), GlobalStats.from_stats(b, BANKS)
    for c in ga.numeric:
        assert np.allclose([ga.numeric[c].mean, ga.numeric[c].std], [gb.numeric[c].mean, gb.numeric[c].std])


def test_from_frame_counts(banks_typed):
    s = SufficientStats.from_frame(banks_typed, BANKS)
    inc = banks_typed["income"].dropna().to_numpy()
    assert s.rows == len(banks_typed)
    assert s.numeric["income"].count == len(inc)
    assert s.numeric["income"].null_count == banks_typed["income"].isna().sum()
    assert np.isclose(s.numeric["income"].sum, inc.sum()) and np.isclose(
        s.numeric["income"].sum_sq, (inc**2).sum()
    )
    assert set(s.numeric["income"].model_dump()) == {"count", "sum", "sum_sq", "null_count"}  # no min/max
    assert s.categorical["student"].counts == banks_typed["student"].value_counts().to_dict()
    assert s.categorical["student"].other_count == 0 and s.label_other_count == 0
    assert s.label_counts == banks_typed["default"].value_counts().sort_index().to_dict()
    assert set(s.numeric) == {"balance", "income"} and set(s.categorical) == {"student"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_partner_stats_equal_pooled_stats(banks_typed, seed):
    rng = np.random.default_rng(seed)
    pooled = SufficientStats.from_frame(banks_typed, BANKS)
    # uneven, random partition into 4 partners (one very small)
    part = rng.choice(4, size=len(banks_typed), p=[0.6, 0.25, 0.14, 0.01])
    partners = [SufficientStats.from_frame(banks_typed[part == i], BANKS) for i in range(4)]
    for order in itertools.permutations(range(4)):
        _assert_same(merge([partners[i] for i in order]), pooled)
    # associativity: ((a+b)+(c+d)) == (a+(b+(c+d)))
    left = merge([merge(partners[:2]), merge(partners[2:])])
    right = merge([partners[0], merge([partners[1], merge(partners[2:])])])
    _assert_same(left, pooled)
    _assert_same(right, pooled)
    g = GlobalStats.from_stats(left, BANKS)
    bal = banks_typed["balance"].to_numpy()
    assert np.isclose(g.numeric["balance"].mean, bal.mean()) and np.isclose(
        g.numeric["balance"].std, bal.std()
    )


def test_update_chunk_by_chunk_equals_whole(banks_typed):
    s = SufficientStats.empty(BANKS)
    for i in range(0, len(banks_typed), 701):
        s.update(banks_typed.iloc[i : i + 701], BANKS)
    _assert_same(s, SufficientStats.from_frame(banks_typed, BANKS))
    s2 = SufficientStats.empty(BANKS).update(banks_typed)  # contract looked up by name
    _assert_same(s2, s)


def test_stats_are_json_round_trippable(banks_typed):
    s = SufficientStats.from_frame(banks_typed, BANKS)
    back = SufficientStats.model_validate(json.loads(s.model_dump_json()))
    assert back == s
    g = GlobalStats.from_stats(s, BANKS)
    assert GlobalStats.model_validate_json(g.model_dump_json()) == g


def test_merge_refuses_mixed_datasets_and_empty_lists(banks_typed):
    with pytest.raises(ValueError):
        merge([])
    other = SufficientStats.empty(load_contract("hospitals"))
    with pytest.raises(ValueError, match="cannot merge"):
        merge([SufficientStats.from_frame(banks_typed, BANKS), other])


TOY = Contract.model_validate(
    {
        "name": "toy",
        "version": 2,
        "label": "y",
        "positive_label": "yes",
        "row_key": ["id"],
        "columns": {
            "id": {"dtype": "string", "role": "id"},
            "ts": {"dtype": "timestamp", "role": "timestamp"},
            "a": {"dtype": "float", "nullable": True, "missing": "mean"},
            "b": {"dtype": "int", "nullable": True, "missing": "constant", "fill_value": 10},
            "c": {"dtype": "float", "nullable": True, "missing": "indicator"},
            "k": {"dtype": "int"},
            "cat": {"dtype": "category", "nullable": True, "missing": "mode"},
            "col": {
                "dtype": "category",
                "allowed": ["red", "green"],
                "nullable": True,
                "missing": "indicator",
            },
            "skip": {"dtype": "string", "role": "ignore"},
            "y": {"dtype": "category", "role": "label", "allowed": ["no", "yes"]},
        },
        "model": {"kind": "mlp"},
    }
)


def toy_frame() -> pd.DataFrame:
    raw = pd.DataFrame(
        {
            "id": ["u1", "u2", "u3", "u4"],
            "ts": ["1970-01-01T00:00:10Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:01+00:00", "2024-01-02"],
            "a": ["1", "3", None, "5"],
            "b": ["0", None, "20", "10"],
            "c": ["2", "2", None, "2"],
            "k": ["7", "7", "7", "7"],
            "cat": ["x", "z", "z", None],
            "col": ["red", "blue", None, "green"],
            "skip": ["s", "s", "s", "s"],
            "y": ["no", "yes", "no", "yes"],
        },
        dtype="str",
    )
    return coerce_types(raw, TOY, object_key="toy/x.csv")


#: ``cat`` has no ``allowed`` list: its categories are counted and one-hot encoded by hashed bucket, not name
X, Z = (f"#{b}" for b in hash_ids(["x", "z"], TOY.model.hash_buckets))


def test_global_stats_guards_and_vocab():
    s = SufficientStats.from_frame(toy_frame(), TOY)
    g = GlobalStats.from_stats(s, TOY)
    assert g.numeric["a"].mean == 3.0 and np.isclose(g.numeric["a"].std, np.std([1, 3, 5]))
    assert g.numeric["k"].std == 1.0  # constant feature: std 0 → 1
    assert g.numeric["c"].std == 1.0
    assert s.categorical["cat"].counts == {X: 1, Z: 2}
    assert g.categorical["cat"].vocab == sorted([X, Z], key=lambda k: int(k[1:]))  # bucket order
    assert g.categorical["cat"].mode == Z
    assert g.categorical["col"].vocab == ["green", "red"]  # the contract's allowed values, sorted
    assert g.categorical["col"].mode == "green"  # tie green/red (blue is not in the vocabulary) → smallest
    assert s.categorical["col"].counts == {"green": 1, "red": 1} and s.categorical["col"].other_count == 1
    assert g.label_counts == {"no": 2, "yes": 2} and g.positive_rate(TOY) == 0.5


def test_transform_is_the_model_ready_frame():
    df = toy_frame()
    g = GlobalStats.from_stats(SufficientStats.from_frame(df, TOY), TOY)
    out = transform(df, TOY, g)
    names = feature_names(TOY, g)
    cat = [f"cat={k}" for k in g.categorical["cat"].vocab]
    assert names == [
        "a",
        "b",
        "c",
        "c__missing",
        "k",
        *cat,
        "col=green",
        "col=red",
        "col__missing",
    ]
    assert list(out.columns) == ["id", "ts", *names, "label"]
    assert all(out[n].dtype == np.float32 for n in names)
    assert out["label"].dtype == np.int8 and out["label"].tolist() == [0, 1, 0, 1]
    assert out["id"].tolist() == ["u1", "u2", "u3", "u4"] and pd.api.types.is_string_dtype(out["id"].dtype)
    assert out["ts"].dtype == np.int64 and out["ts"].tolist()[:3] == [10, 1704067200, 1704067201]
    assert "skip" not in out.columns and "y" not in out.columns
    a = out["a"].to_numpy()
    sd = np.std([1, 3, 5])
    assert np.allclose(a, [(1 - 3) / sd, 0, 0, (5 - 3) / sd], atol=1e-6)  # missing → mean → 0
    b = g.numeric["b"]
    assert np.isclose(out["b"].iloc[1], (10 - b.mean) / b.std, atol=1e-6)  # constant fill, standardized
    assert out["c__missing"].tolist() == [0, 0, 1, 0] and out["c"].tolist() == [0, 0, 0, 0]
    # missing → mode z (by its bucket)
    assert out[[f"cat={X}", f"cat={Z}"]].to_numpy().tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    # blue is unseen → all zeros; missing col → mode (green) + indicator
    assert out[["col=green", "col=red", "col__missing"]].to_numpy().tolist() == [
        [0, 1, 0],
        [0, 0, 0],
        [1, 0, 1],
        [1, 0, 0],
    ]


def test_transform_refuses_mismatched_stats():
    g = GlobalStats.from_stats(SufficientStats.from_frame(toy_frame(), TOY), TOY)
    with pytest.raises(ValueError, match="do not match"):
        transform(toy_frame(), BANKS, g)


def test_transform_banks_shape(banks_typed):
    g = GlobalStats.from_stats(SufficientStats.from_frame(banks_typed, BANKS), BANKS)
    out = transform(banks_typed, BANKS, g)
    assert feature_names(BANKS, g) == ["student=No", "student=Yes", "balance", "income", "income__missing"]
    assert np.isclose(out["balance"].mean(), 0, atol=1e-5) and np.isclose(
        out["balance"].std(ddof=0), 1, atol=1e-4
    )
    assert out["label"].sum() == (banks_typed["default"] == "Yes").sum()
