"""No cell value leaves a site in the statistics: no min/max, no undeclared category, no raw string.

Staging manifests carry ``SufficientStats`` (``statistics_train``) and each run's ``stats.json`` is their
merge, so these tests dump the statistics to JSON exactly as they travel and look for every cell value of the
input in it: as text (``repr``/``str``, the way JSON writes a float) and as a number (the same float64,
compared bit for bit). Counts, sums and sums of squares are allowed to leave (secure aggregation protects
them later); the test frames are built so that none of them coincides with a cell value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.features import (
    CategoricalStats,
    GlobalStats,
    SufficientStats,
    category_keys,
    declared_range,
    feature_names,
    merge,
    transform,
)
from lepton_tasks.ingest.clean import coerce_types
from lepton_tasks.ingest.prepare import prepare_drop
from lepton_tasks.ops.scenarios import to_csv_bytes
from lepton_tasks.trainer.data import hash_ids

BANKS = load_contract("banks")
#: one ISLR customer's exact income: the column's maximum, which the statistics used to carry verbatim
RICHEST = 73554.23349519724


def _leaves(obj: Any) -> Iterator[Any]:
    """Every key and leaf value of a parsed JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def _float_bits(x: float) -> bytes:
    return np.float64(x).tobytes()


def assert_no_cell_leaves(text: str, numbers: Iterable[float] = (), strings: Iterable[str] = ()) -> None:
    """No number of ``numbers`` is in the JSON ``text`` (as text or a float64), nor any of ``strings``."""
    doc = json.loads(text)
    leaves = list(_leaves(doc))
    leaf_bits = {_float_bits(v) for v in leaves if isinstance(v, int | float) and not isinstance(v, bool)}
    leaf_strings = {v for v in leaves if isinstance(v, str)}
    for x in numbers:
        x = float(x)
        if np.isnan(x) or x.is_integer():  # whole numbers may coincide with counts, which may leave
            continue
        for form in {repr(x), str(x), json.dumps(x), f"{x:.17g}"}:
            assert form not in text, f"cell value {x!r} leaves as {form!r}"
        assert _float_bits(x) not in leaf_bits, f"cell value {x!r} leaves as a number"
    for s in strings:
        assert s not in leaf_strings, f"cell value {s!r} leaves as a key or string"
        assert json.dumps(s) not in text, f"cell value {s!r} leaves in the text"


@pytest.fixture(scope="module")
def banks_all() -> pd.DataFrame:
    from lepton_tasks.ops.scenarios.banks import load_default

    df = load_default().copy()
    df.loc[df.index % 17 == 0, "income"] = np.nan
    return coerce_types(df, BANKS, object_key="banks/x.csv")


def test_banks_statistics_carry_no_cell_value(banks_all):
    assert banks_all["income"].max() == RICHEST  # the distinctive value is in the frame...
    parts = [SufficientStats.from_frame(banks_all.iloc[i::3], BANKS) for i in range(3)]
    for stats in [*parts, merge(parts)]:  # ...in no partner's statistics and not in their merge (stats.json)
        text = stats.model_dump_json()
        assert "min" not in json.loads(text)["numeric"]["income"]
        assert "max" not in json.loads(text)["numeric"]["income"]
        assert_no_cell_leaves(
            text,
            numbers=[RICHEST, *banks_all["income"].dropna(), *banks_all["balance"]],
            strings=list(banks_all["customer_id"]),
        )


def test_staged_statistics_carry_no_cell_value(tmp_path, banks_all):
    """End to end through ingest (what ``statistics_train`` of the manifest is built from)."""
    raw = banks_all.astype({"income": "float64"}).head(2000)
    src = tmp_path / "bank.csv"
    src.write_bytes(to_csv_bytes(raw))
    prep = prepare_drop(src, BANKS, object_key="banks/bank.csv", out_dir=tmp_path / "out")
    assert prep.stats.rows == prep.rows_train > 1000
    assert_no_cell_leaves(
        prep.stats.model_dump_json(),
        numbers=[*raw["income"].dropna(), *raw["balance"]],
        strings=list(raw["customer_id"]),
    )


#: a contract exercising every categorical path: declared but non-critical (undeclared values pass
#: cleaning), no ``allowed`` list at all (hashed), and a label without ``allowed``
OPEN = Contract.model_validate(
    {
        "name": "open",
        "version": 1,
        "label": "y",
        "positive_label": "yes",
        "row_key": ["id"],
        "rows": {"min": 1},
        "holdout_fraction": 0.25,
        "columns": {
            "id": {"dtype": "string", "role": "id", "unique": True},
            "region": {"dtype": "category", "allowed": ["north", "south"], "critical": False},
            "city": {"dtype": "category", "nullable": True, "missing": "mode"},
            "amount": {"dtype": "float", "clip": [0, 1000]},
            "y": {"dtype": "category", "role": "label"},
        },
        "model": {"kind": "mlp", "hash_buckets": 64},
    }
)
CITIES = ["Aberdeen", "Bergen", "Cork", "Dundee"]
SECRET_REGION = "Flat 3, 12 Privet Drive"  # a free-text value typed into a declared category column
SECRET_LABEL = "yes (see complaint #8812)"


def open_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    df = pd.DataFrame(
        {
            "id": [f"p{i:04d}" for i in range(n)],
            "region": rng.choice(["north", "south"], size=n).astype(object),
            "city": rng.choice(CITIES, size=n).astype(object),
            "amount": rng.uniform(1, 999, size=n).round(6) + 0.000123,
            "y": rng.choice(["yes", "no"], size=n).astype(object),
        }
    )
    df.loc[3, "region"] = SECRET_REGION
    df.loc[5, "city"] = None
    df.loc[8, "y"] = SECRET_LABEL
    return coerce_types(df.astype({"amount": "str"}), OPEN, object_key="open/x.csv")


def test_only_declared_categories_and_hashed_buckets_leave():
    df = open_frame()
    s = SufficientStats.from_frame(df, OPEN)
    assert_no_cell_leaves(
        s.model_dump_json(),
        numbers=df["amount"],
        strings=[SECRET_REGION, SECRET_LABEL, *CITIES, *df["id"]],
    )
    region = s.categorical["region"]
    assert set(region.counts) <= {"north", "south"} and region.other_count == 1  # counted, never named
    assert sum(region.counts.values()) + region.other_count == len(df)
    city = s.categorical["city"]
    buckets = {f"#{b}" for b in hash_ids(CITIES, OPEN.model.hash_buckets)}
    assert set(city.counts) == buckets and city.null_count == 1  # the model's id hashing, bucket by bucket
    assert s.label_counts == {"yes": int((df["y"] == "yes").sum())}  # only the (public) positive label
    assert s.label_other_count == len(df) - s.label_counts["yes"]
    g = GlobalStats.from_stats(s, OPEN)
    assert np.isclose(g.positive_rate(OPEN), (df["y"] == "yes").mean())


def test_undeclared_values_pass_ingest_but_not_the_statistics(tmp_path):
    raw = open_frame().astype({"amount": "float64"})
    src = tmp_path / "open.csv"
    src.write_bytes(to_csv_bytes(raw))
    prep = prepare_drop(src, OPEN, object_key="open/open.csv", out_dir=tmp_path / "out")
    train = pd.read_parquet(prep.train_path)
    assert prep.stats.rows == len(train) and prep.stats.label_counts["yes"] == (train["y"] == "yes").sum()
    assert [w.code for w in prep.warnings] == ["not_allowed"]  # non-critical: the row is kept...
    assert SECRET_REGION in set(train["region"])
    assert prep.stats.categorical["region"].other_count == 1  # ...and counted, unnamed
    assert_no_cell_leaves(
        prep.stats.model_dump_json(),
        numbers=raw["amount"],
        strings=[SECRET_REGION, SECRET_LABEL, *CITIES, *raw["id"]],
    )


def test_hashed_categories_transform_by_bucket():
    df = open_frame()
    g = GlobalStats.from_stats(SufficientStats.from_frame(df, OPEN), OPEN)
    names = feature_names(OPEN, g)
    assert [n for n in names if n.startswith("city=")] == [f"city={k}" for k in g.categorical["city"].vocab]
    assert not any(c in n for n in names for c in CITIES)
    out = transform(df, OPEN, g)
    keys = category_keys(df["city"], OPEN.columns["city"], OPEN.model.hash_buckets)
    filled = keys.fillna(g.categorical["city"].mode)  # missing → the federated mode's bucket
    for k in g.categorical["city"].vocab:
        assert out[f"city={k}"].tolist() == (filled == k).astype(float).tolist()
    # the undeclared region value is encoded like an unseen category: all zeros
    assert out.loc[3, ["region=north", "region=south"]].tolist() == [0, 0]
    assert out.loc[8, "label"] == 0  # only the positive label is 1


def test_category_keys_match_the_model_hashing_and_keep_missing():
    s = pd.Series(["u1", None, "u2", "u1"], dtype="str")
    keys = category_keys(s, OPEN.columns["city"], 1000)
    assert keys.isna().tolist() == [False, True, False, False]
    assert keys.dropna().tolist() == [f"#{b}" for b in hash_ids(["u1", "u2", "u1"], 1000)]
    declared = pd.Series(["north", None, "elsewhere"], dtype="str")  # declared: the values themselves
    pd.testing.assert_series_equal(category_keys(declared, OPEN.columns["region"], 1000), declared)
    with pytest.raises(ValueError, match="hash_buckets"):
        category_keys(s, OPEN.columns["city"], 1)


def test_merged_other_counts_add_up():
    df = open_frame()
    a, b = SufficientStats.from_frame(df.iloc[:100], OPEN), SufficientStats.from_frame(df.iloc[100:], OPEN)
    m = merge([a, b])
    assert m.categorical["region"].other_count == 1 and m.label_other_count == a.label_other_count + (
        b.label_other_count
    )
    assert m.categorical["region"] == a.categorical["region"].add(b.categorical["region"])
    assert CategoricalStats().add(CategoricalStats(other_count=2)).other_count == 2


def test_statistics_written_before_still_load_without_their_extremes():
    old = {
        "dataset": "banks",
        "contract_version": 1,
        "rows": 2,
        "numeric": {
            "balance": {"count": 2, "sum": 3.0, "sum_sq": 5.0, "min": 1.0, "max": 2.0, "null_count": 0},
            "income": {"count": 2, "sum": 3.0, "sum_sq": 5.0, "min": 1.0, "max": RICHEST, "null_count": 0},
        },
        "categorical": {"student": {"counts": {"No": 2}, "null_count": 0}},
        "label_counts": {"No": 2},
    }
    s = SufficientStats.model_validate(old)
    assert str(RICHEST) not in s.model_dump_json()
    g = GlobalStats.from_stats(s, BANKS)
    assert (g.numeric["income"].mean, g.numeric["income"].std) == (1.5, 0.5)


def test_normalization_is_the_z_score_of_the_sums(banks_all):
    """Removing min/max changed no model input: every numeric feature is still (x - mean) / std."""
    g = GlobalStats.from_stats(SufficientStats.from_frame(banks_all, BANKS), BANKS)
    out = transform(banks_all, BANKS, g)
    for c in ("balance", "income"):
        x = banks_all[c].to_numpy(dtype="float64", na_value=np.nan)
        present = ~np.isnan(x)
        expected = np.where(present, (x - x[present].mean()) / x[present].std(), 0.0)
        assert np.allclose(out[c].to_numpy(), expected, atol=1e-5)
        lo, hi = declared_range(BANKS.columns[c])  # public bounds, where a range is needed
        assert lo is not None and hi is not None and lo <= x[present].min() and x[present].max() <= hi


def test_declared_range_prefers_clip_then_min_max():
    assert declared_range(BANKS.columns["income"]) == (0.0, 250000.0)  # clip
    assert declared_range(load_contract("hospitals").columns["mean_radius"]) == (0, None)  # min only
    assert declared_range(OPEN.columns["amount"]) == (0.0, 1000.0)
