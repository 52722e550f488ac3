"""Dataset contracts: the YAML files load, are coherent, and match the scenario data partners drop."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lepton_tasks.core.contracts import Contract, available, load_contract


def test_all_contracts_load():
    assert {"banks", "hospitals", "ecommerce"} <= set(available())
    for name in available():
        c = load_contract(name)
        assert c.name == name
        assert c.columns[c.label].role == "label"
        assert c.positive_label in (c.columns[c.label].allowed or [c.positive_label])
        for key in c.row_key:
            assert c.columns[key].role == "id" and c.columns[key].unique


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError, match="banks"):
        load_contract("weather")
    with pytest.raises(KeyError):
        load_contract("../secrets")


def test_banks_contract():
    c = load_contract("banks")
    assert list(c.columns) == ["customer_id", "student", "balance", "income", "default"]
    assert c.positive_label == "Yes" and c.model.kind == "mlp"
    assert c.columns["student"].allowed == ["No", "Yes"]
    assert c.columns["balance"].min == 0 and c.columns["income"].min == 0
    assert c.feature_columns() == ["student", "balance", "income"]
    assert c.columns_with_role("id") == ["customer_id"]


def test_hospitals_contract():
    c = load_contract("hospitals")
    features = c.feature_columns()
    assert len(features) == 30 and all(f == f.lower() and " " not in f for f in features)
    assert c.positive_label == "malignant" and c.model.kind == "mlp"


def test_ecommerce_contract_is_a_sequence_model():
    c = load_contract("ecommerce")
    m = c.model
    assert m.kind == "sequence"
    for col in (m.user_column, m.item_column, m.timestamp_column):
        assert col in c.columns
    assert c.columns["timestamp"].dtype == "timestamp" and c.columns["timestamp"].role == "timestamp"
    assert c.columns["price"].clip == (0.5, 5000)
    assert set(c.columns_with_role("id")) == {"event_id", "user_id", "item_id"}


def test_contract_columns_match_scenario_frames():
    from lepton_tasks.ops.scenarios import SCENARIOS

    for name in ("banks", "ecommerce"):
        sc = SCENARIOS[name]
        frames = sc.generate(0) if name == "banks" else sc.generate(0, rows_per_partner=50)
        for df in frames.values():
            assert list(df.columns) == list(load_contract(sc.dataset).columns)


def test_schema_extensions_have_defaults():
    c = load_contract("banks")
    assert all(s.required for s in c.columns.values())
    assert "" in c.null_values and "NA" in c.null_values
    assert c.required_columns() == list(c.columns)


def _minimal(**overrides) -> dict:
    d = {
        "name": "t",
        "version": 1,
        "label": "y",
        "positive_label": "1",
        "row_key": ["id"],
        "columns": {"id": {"dtype": "string", "role": "id"}, "y": {"dtype": "category", "role": "label"}},
        "model": {"kind": "mlp"},
    }
    d.update(overrides)
    return d


def test_invalid_contracts_are_refused():
    Contract.model_validate(_minimal())
    with pytest.raises(ValidationError, match="label"):
        Contract.model_validate(_minimal(label="nope"))
    with pytest.raises(ValidationError, match="row_key"):
        Contract.model_validate(_minimal(row_key=["nope"]))
    with pytest.raises(ValidationError):
        Contract.model_validate(_minimal(holdout_fraction=1.5))
    bad = _minimal()
    bad["columns"]["id"]["typo"] = 1
    with pytest.raises(ValidationError):
        Contract.model_validate(bad)
