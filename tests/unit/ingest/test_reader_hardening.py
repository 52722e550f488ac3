"""Hardening of the readers: pandas' stored index in Parquet is not a column, UTF-16 without a byte-order
mark is named as such, and no message grows with the file (lists and values are capped)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lepton_tasks.core.drops import MAX_MESSAGE, DropError, cap_list, clip_text
from lepton_tasks.ingest.prepare import process_file
from tests.unit.ingest.test_bad_input import BANKS, HEADER, csv_bytes, good_rows, rejected, run


def banks_frame(n: int = 80) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "student": ["Yes" if i % 3 == 0 else "No" for i in range(n)],
            "balance": [100.0 + i for i in range(n)],
            "income": [20000.0 + 37 * i for i in range(n)],
            "default": ["Yes" if i % 10 == 0 else "No" for i in range(n)],
        }
    )


# ------------------------------------------------------------------------------------- pandas index (3)


def test_parquet_written_by_pandas_with_its_index_is_accepted(tmp_path):
    df = banks_frame()
    frame = df[df["student"] == "No"].sort_values("customer_id")  # a filtered frame: index 1, 2, 4, 5, …
    path = tmp_path / "drop.parquet"
    frame.to_parquet(path)  # pandas stores the index as __index_level_0__
    import pyarrow.parquet as pq

    assert "__index_level_0__" in pq.ParquetFile(path).schema_arrow.names
    train, holdout, report, _, _ = process_file(path, BANKS, "banks/drop.parquet")
    assert list(train.columns) == list(BANKS.columns)
    assert len(train) + len(holdout) == len(frame) == report.rows_out


def test_a_named_index_that_is_a_contract_column_is_data(tmp_path):
    path = tmp_path / "drop.parquet"
    banks_frame().set_index("customer_id").to_parquet(path)
    train, holdout, _, _, _ = process_file(path, BANKS, "banks/drop.parquet")
    assert sorted([*train["customer_id"], *holdout["customer_id"]]) == [f"c{i:05d}" for i in range(80)]


def test_a_real_unexpected_column_is_still_rejected(tmp_path):
    path = tmp_path / "drop.parquet"
    banks_frame().assign(extra=1).to_parquet(path, index=False)
    err = rejected(tmp_path, path.read_bytes(), "unexpected_column", key="banks/drop.parquet")
    assert "'extra'" in err.message


# ------------------------------------------------------------------------------------ UTF-16 no BOM (5)


@pytest.mark.parametrize(
    ("codec", "named"),
    [
        ("utf-16-le", "UTF-16 (little-endian)"),
        ("utf-16-be", "UTF-16 (big-endian)"),
        ("utf-32-le", "UTF-32 (little-endian)"),
        ("utf-32-be", "UTF-32 (big-endian)"),
    ],
)
def test_utf16_and_utf32_without_bom_are_named_with_the_fix(tmp_path, codec, named):
    content = csv_bytes(good_rows(60)).decode().encode(codec)  # these codecs write no BOM
    assert not content.startswith((b"\xff\xfe", b"\xfe\xff"))
    err = rejected(tmp_path, content, "unsupported_encoding")
    assert f"probably {named}" in err.message and "binary" not in err.message
    assert "UTF-8" in err.fix and "iconv -f" in err.fix


def test_utf16_with_accented_text_is_still_recognized(tmp_path):
    content = (HEADER + "\nc1,No,1.5,2.5,Ünïcödé façade\n").encode("utf-16-le")
    err = rejected(tmp_path, content, "unsupported_encoding")
    assert "UTF-16 (little-endian)" in err.message


def test_real_binary_is_still_binary(tmp_path):
    content = bytes(range(256)) * 40
    err = rejected(tmp_path, content, "unrecognized_format")
    assert "binary" in err.message


# --------------------------------------------------------------------------------- bounded messages (4)


def wide_header(extra: int) -> str:
    return HEADER + "," + ",".join(f"extra_column_{i:04d}" for i in range(extra))


def test_a_2000_column_file_gives_a_short_message(tmp_path):
    header = wide_header(1995)
    content = (header + "\n" + ",".join(["1"] * 2000) + "\n").encode()
    err = rejected(tmp_path, content, "unexpected_column")
    assert len(str(err)) < 1000, len(str(err))  # was 36,159 characters
    assert len(json.dumps(err.to_reason())) < 1500  # was 36,244
    assert "1,995 unexpected column(s)" in err.message and "… and 1,985 more" in err.message


def test_a_2000_column_file_missing_a_column_keeps_details_short(tmp_path):
    header = ",".join(HEADER.split(",")[:-1]) + "," + ",".join(f"x{i}" for i in range(1996))
    content = (header + "\n" + ",".join(["1"] * 2000) + "\n").encode()
    err = rejected(tmp_path, content, "missing_column", column="default")
    assert len(json.dumps(err.to_reason())) < 1500  # was 32,256: every found column in details
    assert err.details["found_count"] == 2000 and "… and 1,990 more" in err.details["found"]


def test_a_huge_bad_value_is_clipped_in_the_message_and_samples(tmp_path):
    huge = "9" * 50_000 + "x"
    content = csv_bytes([*good_rows(60), f"c99999,No,{huge},1.0,No"])
    err = rejected(tmp_path, content, "wrong_type", column="balance")
    assert len(str(err)) < 1000
    assert len(json.dumps(err.to_reason())) < 2000


def test_cap_list():
    assert cap_list(["a", "b"]) == "a, b"
    assert cap_list(range(2000), 3) == "0, 1, 2 … and 1,997 more"
    assert cap_list(["x"], fmt=repr) == "'x'"
    assert cap_list(["y" * 500]).endswith("… (300 more characters)")
    assert clip_text("short") == "short"


def test_every_drop_error_message_is_bounded():
    err = DropError("x", "m" * 100_000, file="banks/a.csv", fix="f" * 100_000, column="c" * 10_000)
    assert len(err.message) < MAX_MESSAGE + 50 and len(err.fix) < MAX_MESSAGE + 50
    assert len(json.dumps(err.to_reason())) < 3 * MAX_MESSAGE


def test_a_key_with_many_bad_characters_is_capped():
    from lepton_tasks.core.drops import parse_drop_key

    with pytest.raises(DropError) as info:
        parse_drop_key(
            "banks/" + "".join(chr(c) for c in range(33, 127) if chr(c) not in "./\\") + ".csv", ["banks"]
        )
    assert info.value.code == "key_bad_name" and "more" in info.value.message


def test_good_wide_frames_still_work(tmp_path):
    run(tmp_path, csv_bytes(good_rows(60)))
