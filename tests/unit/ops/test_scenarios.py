"""Scenarios: real and synthetic partner data, non-IID splits, CSV as dropped, and the prepare slice."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import load_contract
from lepton_tasks.core.features import SufficientStats, merge
from lepton_tasks.ingest.prepare import prepare_drop, process_file
from lepton_tasks.ingest.split import holdout_mask
from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes
from lepton_tasks.ops.scenarios.banks import CARD_LIMIT, PRIME_INCOME, load_default
from lepton_tasks.ops.scenarios.ecommerce import retailer_frame, write_csv


@pytest.fixture(scope="module")
def banks():
    return SCENARIOS["banks"].generate(0)


@pytest.fixture(scope="module")
def hospitals():
    return SCENARIOS["hospitals"].generate(0)


@pytest.fixture(scope="module")
def shops():
    return SCENARIOS["ecommerce"].generate(0, rows_per_partner=4000)


def test_registry():
    assert set(SCENARIOS) == {"banks", "hospitals", "ecommerce"}
    for name, (dataset, partners, generate) in SCENARIOS.items():
        assert dataset == name and len(partners) == 3 and callable(generate)
        load_contract(dataset)


def test_deterministic_per_seed(banks):
    again = SCENARIOS["banks"].generate(0)
    assert all(again[p].equals(banks[p]) for p in banks)
    other = SCENARIOS["banks"].generate(1)
    for p in ("bank_a", "bank_b", "bank_c"):  # the seed drives the draws within every segment
        assert not other[p]["customer_id"].equals(banks[p]["customer_id"])
    e1 = SCENARIOS["ecommerce"].generate(3, rows_per_partner=300)
    e2 = SCENARIOS["ecommerce"].generate(3, rows_per_partner=300)
    assert all(e1[p].equals(e2[p]) for p in e1)


def test_banks_is_the_real_default_data_split_non_iid(banks):
    everyone = load_default()
    assert len(everyone) == 10_000 and (everyone["default"] == "Yes").sum() == 333  # the ISLR Default data
    pooled = pd.concat(banks.values(), ignore_index=True)
    assert len(pooled) == 10_000 and pooled["customer_id"].is_unique  # every customer in exactly one bank
    assert set(pooled["customer_id"]) == set(everyone["customer_id"])
    assert pooled["customer_id"].str.fullmatch(r"c\d{5}").all()
    assert all(list(d.columns) == list(load_contract("banks").columns) for d in banks.values())
    # rows are unchanged, only distributed
    back = pooled.set_index("customer_id").loc[everyone["customer_id"]].reset_index()
    pd.testing.assert_frame_equal(back, everyone)

    sizes = {p: len(d) for p, d in banks.items()}
    assert sizes["bank_b"] > 2 * sizes["bank_a"] and sizes["bank_a"] > 1.2 * sizes["bank_c"]  # uneven
    student = {p: d["student"] == "Yes" for p, d in banks.items()}
    under_limit = {p: d["balance"] < CARD_LIMIT for p, d in banks.items()}
    # the student bank: students only, all under the student-card limit
    assert student["bank_a"].all() and under_limit["bank_a"].all()
    # the conservative bank: prime (high-income) non-students only, all under its limit
    assert not student["bank_c"].any() and under_limit["bank_c"].all()
    assert (banks["bank_c"]["income"] >= PRIME_INCOME).all()
    # the retail bank: everyone over the limit (students too) and every non-prime non-student
    over = pooled[pooled["balance"] >= CARD_LIMIT]
    assert set(over["customer_id"]) <= set(banks["bank_b"]["customer_id"])
    assert (over["student"] == "Yes").any()
    non_prime = pooled[(pooled["student"] == "No") & (pooled["income"] < PRIME_INCOME)]
    assert set(non_prime["customer_id"]) <= set(banks["bank_b"]["customer_id"])
    assert 0.03 < student["bank_b"].mean() < 0.2

    defaults = {p: int((d["default"] == "Yes").sum()) for p, d in banks.items()}
    rate = {p: defaults[p] / sizes[p] for p in banks}
    assert max(rate["bank_a"], rate["bank_c"]) < 0.02  # the niche banks: few defaults
    assert rate["bank_b"] > 0.04
    assert defaults["bank_b"] > 0.8 * 333  # the retail bank holds most of the defaulters


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 11])
def test_every_bank_has_defaults_to_train_on_and_to_evaluate(seed):
    contract = load_contract("banks")
    for partner, df in SCENARIOS["banks"].generate(seed).items():
        assert contract.rows.min <= len(df) <= contract.rows.max
        held_out = holdout_mask(df, contract)  # the split prepare_drop makes (a per-customer hash)
        y = (df["default"] == "Yes").to_numpy()
        # defaults in both splits: the local model learns from some, and its own-holdout AUC is defined
        assert y[~held_out].sum() >= 10, (partner, seed)
        assert y[held_out].sum() >= 3, (partner, seed)
        assert (~y[held_out]).sum() >= 100, (partner, seed)


def test_hospitals_is_the_real_wdbc_data_split_non_iid(hospitals):
    pooled = pd.concat(hospitals.values())
    assert len(pooled) == 569 and (pooled["diagnosis"] == "malignant").sum() == 212
    assert list(pooled.columns) == list(load_contract("hospitals").columns)
    rate = {p: (d["diagnosis"] == "malignant").mean() for p, d in hospitals.items()}
    assert rate["hospital_a"] < rate["hospital_b"] < rate["hospital_c"]
    assert len({len(d) for d in hospitals.values()}) == 3  # uneven


def test_ecommerce_retailers_are_heterogeneous(shops):
    assert all(len(d) == 4000 for d in shops.values())
    top = {p: d["category"].value_counts().idxmax() for p, d in shops.items()}
    assert top == {"retailer_a": "fashion", "retailer_b": "electronics", "retailer_c": "grocery"}
    price = {p: d["price"].median() for p, d in shops.items()}
    assert price["retailer_b"] > price["retailer_a"] > price["retailer_c"]
    rate = {p: (d["purchased"] == "1").mean() for p, d in shops.items()}
    assert rate["retailer_c"] > rate["retailer_a"] > rate["retailer_b"] > 0.005
    all_events = pd.concat([d["event_id"] for d in shops.values()])
    assert all_events.is_unique
    ts = pd.to_datetime(shops["retailer_a"]["timestamp"], format="ISO8601", utc=True)
    assert ts.is_monotonic_increasing
    assert shops["retailer_a"]["timestamp"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()


def test_ecommerce_has_a_learnable_history_signal():
    df = retailer_frame("retailer_a", 0, 30_000)
    df["y"] = df["purchased"] == "1"
    # the user's most viewed category is their preferred one: purchases are more likely there
    fav = df.groupby("user_id")["category"].agg(lambda s: s.value_counts().idxmax())
    in_fav = df["category"] == df["user_id"].map(fav)
    assert df.loc[in_fav, "y"].mean() > 1.5 * df.loc[~in_fav, "y"].mean()


def test_write_csv_streams_the_same_rows(tmp_path):
    n = 2_345
    path = tmp_path / "big.csv"
    written = write_csv(path, n, 5, retailer="retailer_b", block_rows=1000)
    assert written == path.stat().st_size
    expected = to_csv_bytes(pd.concat([retailer_frame("retailer_b", 5, n)], ignore_index=True))
    # same generator blocks → same bytes when the block size is the default
    write_csv(tmp_path / "d.csv", n, 5, retailer="retailer_b")
    assert (tmp_path / "d.csv").read_bytes() == expected
    back = pd.read_csv(path, dtype=str)
    assert len(back) == n and list(back.columns) == list(load_contract("ecommerce").columns)


def test_to_csv_bytes_round_trips(banks):
    df = banks["bank_c"]
    data = to_csv_bytes(df)
    assert data.startswith(b"customer_id,student,balance,income,default\n") and b"\r\n" not in data
    back = pd.read_csv(io.BytesIO(data))
    assert np.array_equal(back["balance"].to_numpy(), df["balance"].to_numpy())  # full float precision


def test_prepare_every_bank_and_merge_stats(tmp_path, banks):
    contract = load_contract("banks")
    stats, trains = [], []
    for partner, df in banks.items():
        path = tmp_path / f"{partner}.csv"
        path.write_bytes(to_csv_bytes(df))
        p = prepare_drop(path, contract, object_key=f"banks/{partner}.csv", out_dir=tmp_path / partner)
        assert p.rows_in == len(df) == p.rows_train + p.rows_holdout
        assert 0.15 < p.rows_holdout / p.rows_in < 0.25
        assert p.report.rows_out == len(df) and not p.warnings
        assert "PASSED" in p.validation_html
        train = pd.read_parquet(p.train_path)
        assert p.stats.rows == len(train) == p.rows_train  # statistics of the training split only
        stats.append(p.stats)
        trains.append(train)
    pooled = SufficientStats.from_frame(pd.concat(trains, ignore_index=True), contract)
    merged = merge(stats)
    assert merged.rows == pooled.rows and merged.label_counts == pooled.label_counts
    for c in merged.numeric:
        assert np.isclose(merged.numeric[c].sum, pooled.numeric[c].sum)


def test_prepare_is_independent_of_chunking(tmp_path, shops):
    contract = load_contract("ecommerce")
    path = tmp_path / "r.csv"
    path.write_bytes(to_csv_bytes(shops["retailer_b"]))  # pricey: outliers above the clip
    big = process_file(path, contract, "ecommerce/r.csv")
    small = process_file(path, contract, "ecommerce/r.csv", chunk_rows=997)
    for a, b in zip(big[:2], small[:2], strict=True):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert big[2].model_dump() == small[2].model_dump()
    assert big[2].values_clipped.get("price", 0) >= 1  # the synthetic outliers were clipped
    assert big[3].label_counts == small[3].label_counts
    assert len(small[4]) == 6  # 5 chunks + the drop-level row-count check


def test_prepare_a_hospital(tmp_path, hospitals):
    path = tmp_path / "h.parquet"
    hospitals["hospital_c"].to_parquet(path)  # partners may drop Parquet too
    p = prepare_drop(
        path, load_contract("hospitals"), object_key="hospitals/h.parquet", out_dir=tmp_path / "o"
    )
    assert p.rows_train + p.rows_holdout == len(hospitals["hospital_c"])
    assert set(p.stats.label_counts) == {"benign", "malignant"}
