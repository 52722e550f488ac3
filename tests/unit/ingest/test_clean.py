"""clean.coerce_types and clean.Cleaner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.drops import DropError
from lepton_tasks.core.hashing import SeenHashes
from lepton_tasks.ingest.clean import Cleaner, coerce_types, row_hashes, row_numbers

CONTRACT = Contract.model_validate(
    {
        "name": "t",
        "version": 1,
        "label": "y",
        "positive_label": "yes",
        "row_key": ["id"],
        "columns": {
            "id": {"dtype": "string", "role": "id", "unique": True},
            "n": {"dtype": "int", "nullable": True, "missing": "mean", "clip": [0, 10]},
            "x": {"dtype": "float", "nullable": True, "missing": "drop", "clip": [-1.5, 1.5]},
            "flag": {"dtype": "bool", "nullable": True, "missing": "mode"},
            "when": {"dtype": "timestamp", "nullable": True, "missing": "indicator"},
            "cat": {"dtype": "category", "allowed": ["a", "b"], "nullable": True, "missing": "mode"},
            "y": {"dtype": "category", "role": "label", "allowed": ["no", "yes"]},
        },
        "model": {"kind": "mlp"},
    }
)


def raw(**cols) -> pd.DataFrame:
    base = {
        "id": ["r1", "r2", "r3"],
        "n": ["1", "2", "3"],
        "x": ["0.5", "-0.5", "1.0"],
        "flag": ["true", "No", "1"],
        "when": ["2024-01-01T00:00:00Z", "2024-01-01 01:00:00+01:00", "2024-01-02"],
        "cat": ["a", "b", "a"],
        "y": ["no", "yes", "no"],
    }
    base.update(cols)
    return pd.DataFrame(base, dtype="str")


def test_coerce_types_to_canonical_dtypes():
    t = coerce_types(raw(), CONTRACT, object_key="t/x.csv")
    assert str(t["n"].dtype) == "Int64"
    assert t["x"].dtype == np.float64
    assert str(t["flag"].dtype) == "boolean" and t["flag"].tolist() == [True, False, True]
    assert str(t["when"].dtype) == "datetime64[us, UTC]"
    assert t["when"].iloc[1] == pd.Timestamp("2024-01-01T00:00:00Z")  # offset honoured
    assert t["when"].iloc[2] == pd.Timestamp("2024-01-02T00:00:00Z")  # naive = UTC
    assert t["cat"].tolist() == ["a", "b", "a"]


def test_coerce_keeps_missing_and_strings_verbatim():
    t = coerce_types(raw(n=[None, "2", " 3 "], id=[" r1", "=1+1", "r3"]), CONTRACT, object_key="k")
    assert t["n"].isna().tolist() == [True, False, False] and t["n"].iloc[2] == 3
    assert t["id"].tolist() == [" r1", "=1+1", "r3"]


@pytest.mark.parametrize(
    ("column", "values", "bad"),
    [
        ("n", ["1", "2.5", "3"], "2.5"),
        ("n", ["1", "2", "three"], "three"),
        ("x", ["1", "inf", "3"], "inf"),
        ("x", ["1", "1,5", "3"], "1,5"),
        ("flag", ["true", "maybe", "false"], "maybe"),
        ("when", ["2024-01-01", "yesterday", "2024-01-03"], "yesterday"),
        ("when", ["2024-01-01", "2024-13-45", "2024-01-03"], "2024-13-45"),
    ],
)
def test_coerce_errors_name_row_column_and_value(column, values, bad):
    df = raw(**{column: values})
    with pytest.raises(DropError) as info:
        coerce_types(df, CONTRACT, object_key="t/x.csv", row_offset=100)
    err = info.value
    row = 100 + values.index(bad) + 1
    assert (err.code, err.row, err.column) == ("wrong_type", row, column)
    assert repr(bad) in err.message and f"row {row}" in str(err) and "t/x.csv" in str(err)
    assert err.samples[0] == {"row": row, column: bad}


def test_coerce_uses_index_labels_for_rows():
    df = raw(n=["1", "x", "3"])
    df.index = [7, 8, 9]
    with pytest.raises(DropError) as info:
        coerce_types(df, CONTRACT, object_key="k", row_offset=10)
    assert info.value.row == 10 + 8 + 1


def test_coerce_typed_parquet_columns():
    df = pd.DataFrame(
        {
            "id": ["a", "b"],
            "n": pd.Series([1.0, np.nan]),
            "x": pd.Series([1, 2], dtype="int32"),
            "flag": [True, False],
            "when": pd.to_datetime(["2024-01-01", "2024-01-02"]),
            "cat": ["a", "b"],
            "y": ["no", "yes"],
        }
    )
    t = coerce_types(df, CONTRACT, object_key="k")
    assert t["n"].tolist()[0] == 1 and pd.isna(t["n"].iloc[1])
    assert t["x"].tolist() == [1.0, 2.0]
    assert str(t["when"].dtype) == "datetime64[us, UTC]"


def test_row_numbers():
    df = pd.DataFrame({"a": [1, 2]}, index=[0, 5])
    assert row_numbers(df, 10).tolist() == [11, 16]


def test_cleaner_removes_exact_duplicates_within_and_across_chunks():
    cl = Cleaner(CONTRACT, object_key="t/x.csv")
    a = coerce_types(raw(), CONTRACT, object_key="k")
    b_raw = pd.concat([raw().iloc[[2]], raw(id=["r4"] * 3).iloc[[0, 0]]], ignore_index=True)
    b = coerce_types(b_raw, CONTRACT, object_key="k", row_offset=3)
    out_a = cl.process(a)
    out_b = cl.process(b)
    assert len(out_a) == 3
    # r3 in chunk b is identical to r3 in chunk a; r4 twice in chunk b
    assert out_b["id"].tolist() == ["r4"] and list(out_b.index) == [1]
    assert cl.report.duplicates_removed == 2
    assert cl.report.rows_in == 6 and cl.report.rows_out == 4


def test_same_id_different_content_is_not_an_exact_duplicate():
    cl = Cleaner(CONTRACT)
    t = coerce_types(raw(id=["r1", "r1", "r3"]), CONTRACT, object_key="k")
    assert len(cl.drop_duplicates(t)) == 3  # validation's uniqueness check rejects it, not cleaning


def test_missing_policies_and_clipping_are_counted():
    df = raw(
        n=["-4", None, "30"],
        x=["2.0", None, "-9"],
        flag=[None, "true", None],
        when=[None, None, "2024-01-01"],
        cat=["a", None, None],
    )
    cl = Cleaner(CONTRACT, object_key="t/x.csv")
    out = cl.process(coerce_types(df, CONTRACT, object_key="k"))
    r = cl.report
    assert list(out.index) == [0, 2]  # row 1 dropped: x is missing and its policy is drop
    assert r.rows_dropped_missing == {"x": 1}
    assert r.rows_dropped == 1
    assert r.nulls_kept == {"flag": 2, "when": 1, "cat": 1}  # the dropped row's nulls are not "kept"
    assert r.values_clipped == {"n": 2, "x": 2}
    assert out["n"].tolist() == [0, 10] and out["x"].tolist() == [1.5, -1.5]
    assert r.rows_in == 3 and r.rows_out == 2
    assert json.loads(r.model_dump_json())["values_clipped"] == {"n": 2, "x": 2}


def test_missing_label_or_id_always_drops():
    df = raw(y=["no", None, "yes"], id=[None, "r2", "r3"])
    cl = Cleaner(CONTRACT)
    out = cl.process(coerce_types(df, CONTRACT, object_key="k"))
    assert out["id"].tolist() == ["r3"]
    assert cl.report.rows_dropped_missing == {"id": 1, "y": 1}


def test_seen_hashes():
    s = SeenHashes()
    assert not s.contains(np.array([1, 2], dtype=np.uint64)).any()
    s.add(np.array([5, 1, 5], dtype=np.uint64))
    s.add(np.array([3, 1], dtype=np.uint64))
    assert len(s) == 3
    assert s.contains(np.array([1, 2, 3, 5, 2**64 - 1], dtype=np.uint64)).tolist() == [
        True,
        False,
        True,
        True,
        False,
    ]


def test_row_hashes_are_stable_and_content_based():
    a = pd.DataFrame({"a": ["x", "y"], "b": [1.0, 2.0]})
    b = a.iloc[::-1].reset_index(drop=True)
    assert row_hashes(a).tolist() == row_hashes(b).tolist()[::-1]
