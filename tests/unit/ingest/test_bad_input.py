"""Bad drops: every way a partner file can be wrong is rejected with a specific DropError code that names the
file and, where it applies, the row and the column. Files are built in tmp_path; nothing touches S3."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.drops import DropError, parse_drop_key
from lepton_tasks.ingest.prepare import prepare_drop
from lepton_tasks.ingest.validate import render_html

BANKS = load_contract("banks")
HEADER = "customer_id,student,balance,income,default"
DATASETS = ["banks", "hospitals", "ecommerce"]


def good_rows(n: int, start: int = 1) -> list[str]:
    return [
        f"c{i:05d},{'Yes' if i % 3 == 0 else 'No'},{100.0 + i:.2f},{20000 + 37 * i},"
        f"{'Yes' if i % 10 == 0 else 'No'}"
        for i in range(start, start + n)
    ]


def csv_bytes(rows: list[str], header: str = HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def run(
    tmp_path: Path,
    content: bytes,
    *,
    key: str = "banks/drop.csv",
    contract: Contract = BANKS,
    chunk_rows=200_000,
):
    path = tmp_path / key.rsplit("/", 1)[-1]
    path.write_bytes(content)
    return prepare_drop(path, contract, object_key=key, out_dir=tmp_path / "out", chunk_rows=chunk_rows)


def rejected(tmp_path: Path, content: bytes, code: str, *, row=None, column=None, **kw) -> DropError:
    key = kw.get("key", "banks/drop.csv")
    with pytest.raises(DropError) as info:
        run(tmp_path, content, **kw)
    err = info.value
    assert err.code == code, str(err)
    text = str(err)
    assert key in text and err.file == key
    if row is not None:
        assert err.row == row, text
        assert f"row {row}" in text
    if column is not None:
        assert err.column == column, text
        assert repr(column) in text
    reason = err.to_reason()
    assert json.loads(json.dumps(reason))["code"] == code
    assert reason["fix"], "every rejection says how to fix it"
    # no partial outputs are left behind
    assert not (tmp_path / "out" / "train.parquet").exists()
    assert not (tmp_path / "out" / "holdout.parquet").exists()
    return err


# ------------------------------------------------------------------------------------------ file level


def test_empty_file(tmp_path):
    rejected(tmp_path, b"", "empty_file")


def test_whitespace_only_file(tmp_path):
    rejected(tmp_path, b"\n\n  \n", "empty_file")


def test_header_only(tmp_path):
    rejected(tmp_path, csv_bytes([]), "no_data_rows")


def test_header_only_without_newline(tmp_path):
    rejected(tmp_path, HEADER.encode(), "no_data_rows")


def test_truncated_last_line(tmp_path):
    content = csv_bytes(good_rows(60)) + b"c00061,No,12"  # cut mid-row, no newline
    err = rejected(tmp_path, content, "truncated_last_row", row=61)
    assert "truncated" in err.message


def test_ragged_row_in_the_middle(tmp_path):
    rows = good_rows(60)
    rows[41] = "c00042,No,100.0"  # data row 42 has 3 fields
    err = rejected(tmp_path, csv_bytes(rows), "ragged_row", row=42)
    assert "3 field(s) instead of 5" in err.message


def test_ragged_row_reported_correctly_in_a_later_chunk(tmp_path):
    rows = good_rows(120)
    rows[99] = rows[99] + ",extra"
    rejected(tmp_path, csv_bytes(rows), "ragged_row", row=100, chunk_rows=7)


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_wrong_delimiter(tmp_path, delimiter):
    rows = [r.replace(",", delimiter) for r in good_rows(60)]
    err = rejected(tmp_path, csv_bytes(rows, HEADER.replace(",", delimiter)), "wrong_delimiter")
    assert "not commas" in err.message


def test_non_utf8_bytes_name_the_row(tmp_path):
    content = csv_bytes(good_rows(60)).replace(b"c00003,Yes", b"c00003,Y\xe9s")  # latin-1 é
    err = rejected(tmp_path, content, "not_utf8", row=3)
    assert "0xe9" in err.message


def test_utf16_file(tmp_path):
    content = csv_bytes(good_rows(60)).decode().encode("utf-16")
    rejected(tmp_path, content, "unsupported_encoding")


def test_nul_bytes(tmp_path):
    content = csv_bytes(good_rows(60)).replace(b"c00002,", b"c00\x002,")
    rejected(tmp_path, content, "nul_bytes", row=2)


def test_one_megabyte_single_line(tmp_path):
    rows = good_rows(60)
    rows[4] = "c00005,No," + "9" * (1 << 20) + ",1,No"
    err = rejected(tmp_path, csv_bytes(rows), "line_too_long", row=5)
    assert "1048576" in err.message


def test_one_megabyte_file_without_any_newline(tmp_path):
    rejected(tmp_path, b"a" * ((1 << 20) + 10), "line_too_long")


def test_missing_required_column(tmp_path):
    rows = [",".join(r.split(",")[:3] + r.split(",")[4:]) for r in good_rows(60)]
    err = rejected(
        tmp_path, csv_bytes(rows, "customer_id,student,balance,default"), "missing_column", column="income"
    )
    assert "income" in err.fix


def test_missing_column_hints_at_case(tmp_path):
    header = "customer_id,student,Balance,income,default"
    err = rejected(tmp_path, csv_bytes(good_rows(60), header), "missing_column", column="balance")
    assert "case-sensitive" in err.fix


def test_unexpected_extra_column(tmp_path):
    rows = [r + ",x" for r in good_rows(60)]
    rejected(tmp_path, csv_bytes(rows, HEADER + ",notes"), "unexpected_column", column="notes")


def test_duplicated_header(tmp_path):
    rows = [r + ",1.0" for r in good_rows(60)]
    rejected(tmp_path, csv_bytes(rows, HEADER + ",balance"), "duplicate_column", column="balance")


def test_empty_header_name(tmp_path):
    rows = [r + ",1" for r in good_rows(60)]
    rejected(tmp_path, csv_bytes(rows, HEADER + ","), "bad_header")


def test_unterminated_quote(tmp_path):
    content = csv_bytes(good_rows(60)) + b'c00061,No,"12,3,No\n'
    err = rejected(tmp_path, content, "malformed_csv", row=61)
    assert "quot" in err.fix


# ------------------------------------------------------------------------------------- value level


def test_wrong_type_in_numeric_column(tmp_path):
    rows = good_rows(60)
    rows[6] = "c00007,No,12.5k,30000,No"
    err = rejected(tmp_path, csv_bytes(rows), "wrong_type", row=7, column="balance")
    assert "'12.5k'" in err.message
    assert err.samples == [{"row": 7, "balance": "12.5k"}]


def test_decimal_comma_is_a_wrong_type(tmp_path):
    rows = good_rows(60)
    rows[0] = 'c00001,No,"12,5",30000,No'
    err = rejected(tmp_path, csv_bytes(rows), "wrong_type", row=1, column="balance")
    assert "decimal point" in err.fix


def test_wrong_type_row_number_across_chunks(tmp_path):
    rows = good_rows(300)
    rows[249] = "c00250,No,abc,30000,No"
    rejected(tmp_path, csv_bytes(rows), "wrong_type", row=250, column="balance", chunk_rows=64)


def test_value_out_of_range(tmp_path):
    rows = good_rows(60)
    rows[9] = "c00010,No,-5.0,30000,No"
    err = rejected(tmp_path, csv_bytes(rows), "out_of_range", row=10, column="balance")
    assert "at least 0" in err.message


def test_label_not_in_allowed_set(tmp_path):
    rows = good_rows(60)
    rows[11] = "c00012,No,10.0,30000,Maybe"
    err = rejected(tmp_path, csv_bytes(rows), "not_allowed", row=12, column="default")
    assert "'Maybe'" in err.message


def test_category_is_case_sensitive(tmp_path):
    rows = good_rows(60)
    rows[2] = "c00003,yes,10.0,30000,No"
    rejected(tmp_path, csv_bytes(rows), "not_allowed", row=3, column="student")


def test_null_in_non_nullable_column(tmp_path):
    rows = good_rows(60)
    rows[4] = "c00005,No,,30000,No"
    rejected(tmp_path, csv_bytes(rows), "null_value", row=5, column="balance")


def test_null_marker_in_non_nullable_label(tmp_path):
    rows = good_rows(60)
    rows[7] = "c00008,No,1.0,30000,NA"
    rejected(tmp_path, csv_bytes(rows), "null_value", row=8, column="default")


def test_duplicate_id_in_unique_column(tmp_path):
    rows = good_rows(60)
    rows[20] = "c00003,No,999.0,1,No"  # same id as row 3, different content
    err = rejected(tmp_path, csv_bytes(rows), "duplicate_value", row=3, column="customer_id")
    assert {s["row"] for s in err.samples} == {3, 21}


def test_duplicate_id_across_chunks(tmp_path):
    rows = good_rows(100)
    rows[89] = "c00003,No,999.0,1,No"
    err = rejected(tmp_path, csv_bytes(rows), "duplicate_value", row=90, column="customer_id", chunk_rows=16)
    assert "earlier in the file" in err.message


def test_row_count_below_contract_minimum(tmp_path):
    err = rejected(tmp_path, csv_bytes(good_rows(10)), "too_few_rows")
    assert "at least 50" in err.message
    assert err.validation_html and "REJECTED" in err.validation_html


# -------------------------------------------------------------------------------------- format level


@pytest.mark.parametrize(
    "compress",
    [
        pytest.param(gzip.compress, id="gzip"),
        pytest.param(bz2.compress, id="bzip2"),
        pytest.param(lzma.compress, id="xz"),
        pytest.param(lambda b: b"\x28\xb5\x2f\xfd" + b"\x00" * 32, id="zstd"),
    ],
)
def test_compressed_file_named_csv(tmp_path, compress):
    err = rejected(tmp_path, compress(csv_bytes(good_rows(60))), "unsupported_compression")
    assert "not opened" in err.message


def test_zip_archive(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("drop.csv", csv_bytes(good_rows(60)))
    err = rejected(tmp_path, buf.getvalue(), "unsupported_compression")
    assert "zip" in err.message


def test_binary_garbage(tmp_path):
    import random

    rnd = random.Random(7)
    rejected(tmp_path, bytes(rnd.randrange(256) for _ in range(20_000)), "unrecognized_format")


def test_legacy_excel_file(tmp_path):
    content = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500
    err = rejected(tmp_path, content, "unrecognized_format")
    assert "Excel" in err.message


def test_csv_named_parquet(tmp_path):
    rejected(tmp_path, csv_bytes(good_rows(60)), "format_mismatch", key="banks/drop.parquet")


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _banks_table(n: int = 60) -> dict:
    return {
        "customer_id": [f"c{i:05d}" for i in range(n)],
        "student": ["No"] * n,
        "balance": [float(i) for i in range(n)],
        "income": [1000.0 + i for i in range(n)],
        "default": ["No"] * n,
    }


def test_parquet_with_wrong_types(tmp_path):
    data = _banks_table()
    data["balance"] = [f"{i}" for i in range(60)]  # strings are fine (parsed later) ...
    data["student"] = [float(i) for i in range(60)]  # ... floats for a category are not
    content = _parquet_bytes(pa.table(data))
    err = rejected(tmp_path, content, "wrong_schema", column="student", key="banks/drop.parquet")
    assert "double" in err.message


def test_parquet_with_missing_column(tmp_path):
    data = _banks_table()
    del data["income"]
    content = _parquet_bytes(pa.table(data))
    rejected(tmp_path, content, "missing_column", column="income", key="banks/drop.parquet")


def test_parquet_with_bad_value_names_the_row(tmp_path):
    data = _banks_table(100)
    data["balance"] = [str(i) for i in range(100)]
    data["balance"][77] = "lots"
    content = _parquet_bytes(pa.table(data))
    rejected(
        tmp_path, content, "wrong_type", row=78, column="balance", key="banks/drop.parquet", chunk_rows=30
    )


def test_truncated_parquet(tmp_path):
    content = _parquet_bytes(pa.table(_banks_table()))
    rejected(tmp_path, content[: len(content) // 2], "corrupt_parquet", key="banks/drop.parquet")


def test_parquet_without_rows(tmp_path):
    table = pa.table(_banks_table()).slice(0, 0)
    rejected(tmp_path, _parquet_bytes(table), "no_data_rows", key="banks/drop.parquet")


# ---------------------------------------------------------------------------------------- inert text


def test_formula_injection_is_kept_as_inert_text(tmp_path):
    contract = Contract.model_validate(
        {
            "name": "notes",
            "version": 1,
            "label": "y",
            "positive_label": "1",
            "row_key": ["id"],
            "rows": {"min": 1},
            "columns": {
                "id": {"dtype": "string", "role": "id", "unique": True},
                "comment": {"dtype": "string", "role": "ignore"},
                "y": {"dtype": "category", "role": "label", "allowed": ["0", "1"]},
            },
            "model": {"kind": "mlp"},
        }
    )
    payloads = [
        "=cmd|' /C calc'!A0",
        "+1+1",
        "-2+3",
        "@SUM(A1:A2)",
        '=HYPERLINK("http://x")',
        "<script>x</script>",
    ]
    df = pd.DataFrame(
        {"id": [f"r{i}" for i in range(len(payloads))], "comment": payloads, "y": ["0"] * len(payloads)}
    )
    content = df.to_csv(index=False).encode()
    prepared = run(tmp_path, content, key="notes/drop.csv", contract=contract)  # NOT an error
    out = pd.concat([pd.read_parquet(prepared.train_path), pd.read_parquet(prepared.holdout_path)])
    assert sorted(out["comment"]) == sorted(payloads)  # unchanged, as data
    html_text = render_html(prepared.validations, "notes/<drop>.csv")
    assert "<script>" not in html_text and "&lt;drop&gt;" in html_text


# ------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("banks/../hospitals/x.csv", "key_traversal"),
        ("../banks/x.csv", "key_traversal"),
        ("banks/./x.csv", "key_traversal"),
        ("banks//x.csv", "key_traversal"),
        ("/banks/x.csv", "key_absolute"),
        ("banks\\x.csv", "key_backslash"),
        ("banks/x\x00.csv", "key_control_chars"),
        ("banks/x\n.csv", "key_control_chars"),
        ("banks/inv\u202eoice.csv", "key_unicode"),  # bidi override
        ("banks/a\u200bb.csv", "key_unicode"),  # zero-width space
        ("banks/cafe\u0301.csv", "key_unicode"),  # non-NFC
        ("banks/caf\u00e9.csv", "key_unicode"),  # NFC but non-ASCII: still refused (strict)
        ("bank\u0455/x.csv", "key_unicode"),  # Cyrillic look-alike in the dataset name
        ("x.csv", "key_outside_dataset"),
        ("banks/2024/x.csv", "key_too_deep"),
        ("weather/x.csv", "unknown_dataset"),
        ("banks/x.xlsx", "unsupported_extension"),
        ("banks/x.csv.gz", "unsupported_extension"),
        ("banks/x", "unsupported_extension"),
        ("banks/my file.csv", "key_bad_name"),
        ("banks/.hidden.csv", "key_bad_name"),
        ("", "key_empty"),
    ],
)
def test_bad_keys(key, code):
    with pytest.raises(DropError) as info:
        parse_drop_key(key, DATASETS)
    assert info.value.code == code, str(info.value)
    assert info.value.fix


def test_good_key():
    k = parse_drop_key("banks/2024-06_export.v2.CSV", DATASETS)
    assert (k.dataset, k.filename, k.format) == ("banks", "2024-06_export.v2.CSV", "csv")


# ------------------------------------------------------------------------------------ the error itself


def test_drop_error_is_structured_serializable_and_picklable():
    import pickle

    import numpy as np

    err = DropError(
        "wrong_type",
        "bad",
        file="banks/x.csv",
        row=7,
        column="balance",
        fix="do this",
        samples=[{"row": i, "balance": np.float64(i) if i else float("nan")} for i in range(9)],
        details={"n": np.int64(3)},
    )
    assert str(err).startswith("[wrong_type] banks/x.csv, row 7, column 'balance': bad")
    reason = json.loads(json.dumps(err.to_reason()))
    assert reason["row"] == 7 and reason["column"] == "balance" and reason["details"] == {"n": 3}
    assert len(reason["samples"]) == 5 and reason["samples"][0] == {"row": 0, "balance": None}
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.file, back.row, back.column, back.samples) == (
        err.code,
        err.file,
        err.row,
        err.column,
        err.samples,
    )
    assert str(DropError("empty_file", "empty", file="banks/x.csv")) == "[empty_file] banks/x.csv: empty"


def test_neutralize_formula_for_human_exports():
    from lepton_tasks.core.drops import neutralize_formula

    assert neutralize_formula("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert [neutralize_formula(v) for v in ("+1", "-1", "@x", "plain", "")] == [
        "'+1",
        "'-1",
        "'@x",
        "plain",
        "",
    ]
