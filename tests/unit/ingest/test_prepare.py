"""prepare.prepare_drop: the typed fast path and the string path give the same output; the fallback is
automatic."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.drops import DropError
from lepton_tasks.ingest.prepare import _prepare, prepare_drop

TYPED = Contract.model_validate(
    {
        "name": "typed",
        "version": 1,
        "label": "y",
        "positive_label": "yes",
        "row_key": ["id"],
        "holdout_fraction": 0.3,
        "rows": {"min": 1},
        "columns": {
            "id": {"dtype": "string", "role": "id", "unique": True},
            "n": {"dtype": "int", "nullable": True, "missing": "mean"},
            "x": {"dtype": "float", "nullable": True, "missing": "mean"},
            "b": {"dtype": "bool", "nullable": True, "missing": "mode"},
            "ts": {"dtype": "timestamp", "role": "timestamp"},
            "y": {"dtype": "category", "role": "label", "allowed": ["no", "yes"]},
        },
        "model": {"kind": "mlp"},
    }
)
HEADER = "id,n,x,b,ts,y\n"


def _rows(n: int) -> str:
    return "".join(
        f"r{i},{i},{i / 4},{'true' if i % 2 else 'false'},2024-01-01T00:00:{i % 60:02d}Z,"
        f"{'yes' if i % 3 else 'no'}\n"
        for i in range(n)
    )


def _both(tmp_path, text: str) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    p = tmp_path / "d.csv"
    p.write_text(text, encoding="utf-8")
    out = []
    for typed in (True, False):
        d = tmp_path / ("typed" if typed else "text")
        r = _prepare(p, TYPED, object_key="typed/d.csv", out_dir=d, chunk_rows=7, salt="", typed=typed)
        frame = pd.concat([pd.read_parquet(r.train_path), pd.read_parquet(r.holdout_path)]).sort_values("id")
        out += [frame.reset_index(drop=True), r.report.model_dump()]
    return out[0], out[2], out[1], out[3]


def test_typed_and_text_paths_give_identical_output(tmp_path):
    text = (
        HEADER
        + _rows(40)
        + "r1,1,0.25,true,2024-01-01T00:00:01Z,yes\n"
        + "z1,,NaN,,2024-01-01T00:00:00+01:00,no\n"
    )
    typed, plain, rep_typed, rep_plain = _both(tmp_path, text)
    pd.testing.assert_frame_equal(typed, plain)
    assert rep_typed == rep_plain and rep_typed["duplicates_removed"] == 1


@pytest.mark.parametrize(
    ("line", "column", "value", "falls_back"),
    [
        ("q1, 12 ,1.5,true,2024-01-01T00:00:00Z,no", "n", 12, False),  # Arrow trims spaces, as the text path
        ("q1,3.0,1.5,true,2024-01-01T00:00:00Z,no", "n", 3, True),  # a whole float in an int column
        ("q1,3,1.5,yEs,2024-01-01T00:00:00Z,no", "b", True, True),  # mixed-case boolean
        (
            "q1,3,1.5,true,2024-01-01T05:00:00,no",
            "ts",
            pd.Timestamp("2024-01-01T05:00:00Z"),
            True,
        ),  # naive: UTC
    ],
)
def test_values_arrow_does_not_convert_fall_back_to_the_text_path(
    tmp_path, caplog, line, column, value, falls_back
):
    p = tmp_path / "d.csv"
    p.write_text(HEADER + _rows(5) + line + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lepton_tasks.ingest.prepare"):
        r = prepare_drop(p, TYPED, object_key="typed/d.csv", out_dir=tmp_path / "o")
    frame = pd.concat([pd.read_parquet(r.train_path), pd.read_parquet(r.holdout_path)]).set_index("id")
    assert frame.loc["q1", column] == value
    assert ("reading it again as text" in caplog.text) == falls_back


def test_clean_file_stays_on_the_typed_path(tmp_path, caplog):
    p = tmp_path / "d.csv"
    p.write_text(HEADER + _rows(30), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lepton_tasks.ingest.prepare"):
        r = prepare_drop(p, TYPED, object_key="typed/d.csv", out_dir=tmp_path / "o")
    assert r.rows_train + r.rows_holdout == 30
    assert "reading it again" not in caplog.text


@pytest.mark.parametrize(
    ("line", "code", "column"),
    [
        ("q1,abc,1.5,true,2024-01-01T00:00:00Z,no", "wrong_type", "n"),
        ("q1,1,inf,true,2024-01-01T00:00:00Z,no", "wrong_type", "x"),  # Arrow parses inf: still rejected
        ("q1,1,1.5,maybe,2024-01-01T00:00:00Z,no", "wrong_type", "b"),
        ("q1,1,1.5,true,yesterday,no", "wrong_type", "ts"),
        ("q1,1,1.5,true,2024-01-01T00:00:00Z", "ragged_row", None),
    ],
)
def test_bad_values_name_row_and_column_whatever_the_path(tmp_path, line, code, column):
    p = tmp_path / "d.csv"
    p.write_text(HEADER + _rows(5) + line + "\n", encoding="utf-8")
    with pytest.raises(DropError) as err:
        prepare_drop(p, TYPED, object_key="typed/d.csv", out_dir=tmp_path / "o")
    assert err.value.code == code and err.value.row == 6
    assert err.value.column == column
    assert not list((tmp_path / "o").iterdir())  # nothing half-written is left behind
