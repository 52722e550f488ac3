"""readers.iter_chunks: streaming, strings first, exact row offsets, format sniffing."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.drops import DropError
from lepton_tasks.ingest.readers import iter_chunks, sniff_format

BANKS = load_contract("banks")
HEADER = "customer_id,student,balance,income,default\n"


def rows(n: int) -> str:
    return "".join(f"c{i:05d},No,{i}.5,{1000 + i},No\n" for i in range(1, n + 1))


def write(tmp_path, text: str | bytes, name="d.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def test_chunks_have_bounded_size_and_running_offsets(tmp_path):
    p = write(tmp_path, HEADER + rows(23))
    chunks = list(iter_chunks(p, BANKS, object_key="banks/d.csv", chunk_rows=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert [c.attrs["row_offset"] for c in chunks] == [0, 5, 10, 15, 20]
    assert all(list(c.index) == list(range(len(c))) for c in chunks)
    whole = pd.concat(chunks, ignore_index=True)
    assert whole["customer_id"].tolist() == [f"c{i:05d}" for i in range(1, 24)]


def test_every_csv_value_is_read_as_a_string(tmp_path):
    p = write(tmp_path, HEADER + "c00001,No,0012.50,1e3,No\n")
    (df,) = iter_chunks(p, BANKS, object_key="banks/d.csv")
    assert all(pd.api.types.is_string_dtype(df[c].dtype) for c in df.columns)
    assert df.loc[0, "balance"] == "0012.50" and df.loc[0, "income"] == "1e3"  # verbatim


def test_null_values_become_missing(tmp_path):
    p = write(tmp_path, HEADER + "c00001,NA,,NULL,No\n")
    (df,) = iter_chunks(p, BANKS, object_key="banks/d.csv")
    assert df[["student", "balance", "income"]].isna().all().all()


def test_bom_crlf_and_quoted_newlines(tmp_path):
    text = "\ufeff" + HEADER.replace("\n", "\r\n") + 'c00001,No,1.5,"1000",No\r\n"c0\n2",No,2.5,7,No\r\n'
    (df,) = iter_chunks(write(tmp_path, text.encode("utf-8")), BANKS, object_key="banks/d.csv")
    assert list(df.columns) == list(BANKS.columns)
    assert df["customer_id"].tolist() == ["c00001", "c0\n2"]
    assert df["default"].tolist() == ["No", "No"]


def test_header_whitespace_is_tolerated_and_order_is_normalized(tmp_path):
    p = write(tmp_path, " default, income ,balance,student,customer_id\nNo,1,2,No,c1\n")
    (df,) = iter_chunks(p, BANKS, object_key="banks/d.csv")
    assert list(df.columns) == list(BANKS.columns)
    assert df.iloc[0].tolist() == ["c1", "No", "2", "1", "No"]


def _with(contract: Contract, **changes) -> Contract:
    data = contract.model_dump()
    for path, value in changes.items():
        target = data
        *parents, leaf = path.split("__")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return Contract.model_validate(data)


def test_extra_columns_allowed_are_dropped(tmp_path):
    contract = _with(BANKS, allow_extra_columns=True)
    p = write(tmp_path, HEADER.strip() + ",notes\n" + "c1,No,1,2,No,hello\n")
    (df,) = iter_chunks(p, contract, object_key="banks/d.csv")
    assert list(df.columns) == list(BANKS.columns)


def test_optional_missing_column_is_all_null(tmp_path):
    contract = _with(BANKS, columns__income__required=False, columns__income__nullable=True)
    p = write(tmp_path, "customer_id,student,balance,default\nc1,No,1,No\n")
    (df,) = iter_chunks(p, contract, object_key="banks/d.csv")
    assert df["income"].isna().all() and list(df.columns) == list(BANKS.columns)


def test_formula_text_is_read_verbatim(tmp_path):
    contract = _with(BANKS, columns__customer_id__dtype="string")
    p = write(tmp_path, HEADER + "\"=cmd|' /C calc'!A0\",No,1,2,No\n")
    (df,) = iter_chunks(p, contract, object_key="banks/d.csv")
    assert df.loc[0, "customer_id"] == "=cmd|' /C calc'!A0"


def test_parquet_is_streamed_with_offsets(tmp_path):
    n = 50
    table = pa.table(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "student": pa.array(["No", "Yes"] * 25).dictionary_encode(),
            "balance": pa.array(range(n), pa.int32()),
            "income": [1.5] * n,
            "default": ["No"] * n,
            "unused": [1] * n,
        }
    )
    p = tmp_path / "d.parquet"
    pq.write_table(table, p, row_group_size=16)
    contract = _with(BANKS, allow_extra_columns=True)
    chunks = list(iter_chunks(p, contract, object_key="banks/d.parquet", chunk_rows=20))
    assert [len(c) for c in chunks] == [20, 20, 10]
    assert [c.attrs["row_offset"] for c in chunks] == [0, 20, 40]
    df = chunks[0]
    assert list(df.columns) == list(BANKS.columns)
    assert df["student"].tolist()[:2] == ["No", "Yes"]
    assert pd.api.types.is_integer_dtype(df["balance"].dtype)


def test_sniff_by_magic_bytes_not_extension(tmp_path):
    p = write(tmp_path, HEADER + rows(2), name="noext")
    assert sniff_format(p, object_key="banks/noext") == "csv"
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.bin")
    assert sniff_format(tmp_path / "x.bin", object_key="banks/x.bin") == "parquet"
    with pytest.raises(DropError) as info:
        sniff_format(tmp_path / "x.bin", object_key="banks/x.csv")
    assert info.value.code == "format_mismatch"


def test_line_limit_is_configurable(tmp_path):
    p = write(tmp_path, HEADER + rows(1) + "c00002,No,1." + "5" * 40 + ",1,No\n" + rows(2))
    with pytest.raises(DropError) as info:
        list(iter_chunks(p, BANKS, object_key="banks/d.csv", max_line_bytes=50))
    assert info.value.code == "line_too_long" and info.value.row == 2


def test_scan_finds_problems_beyond_the_first_scan_block(tmp_path, monkeypatch):
    from lepton_tasks.ingest import readers

    monkeypatch.setattr(readers, "SCAN_BLOCK", 64)  # many tiny blocks: boundaries inside lines and chars
    body = rows(40).replace("c00031,No", "c00031,N\u00f6")  # valid 2-byte UTF-8 char ...
    p = write(tmp_path, HEADER + body)
    assert sum(len(c) for c in iter_chunks(p, BANKS, object_key="banks/d.csv")) == 40
    p = write(tmp_path, (HEADER + body).encode().replace(b"c00037,No", b"c00037,N\xff"))  # ... and a bad byte
    with pytest.raises(DropError) as info:
        list(iter_chunks(p, BANKS, object_key="banks/d.csv"))
    assert (info.value.code, info.value.row) == ("not_utf8", 37)


def test_chunk_rows_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        list(iter_chunks(write(tmp_path, HEADER + rows(1)), BANKS, object_key="banks/d.csv", chunk_rows=0))
