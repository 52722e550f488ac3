"""validate: the GX suite built from the contract, row numbers, warnings, drop-level checks, HTML."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.drops import DropError
from lepton_tasks.ingest.clean import coerce_types
from lepton_tasks.ingest.validate import (
    ChunkValidation,
    Failure,
    Validator,
    check_row_count,
    raise_for_critical,
    render_html,
    validate_chunk,
)

CONTRACT = Contract.model_validate(
    {
        "name": "t",
        "version": 1,
        "label": "y",
        "positive_label": "1",
        "row_key": ["id"],
        "rows": {"min": 3, "max": 10},
        "columns": {
            "id": {"dtype": "string", "role": "id", "unique": True},
            "n": {"dtype": "int", "min": 0, "max": 100},
            "x": {"dtype": "float", "min": 0, "nullable": True, "critical": False, "missing": "mean"},
            "cat": {"dtype": "category", "allowed": ["a", "b"]},
            "y": {"dtype": "category", "role": "label", "allowed": ["0", "1"]},
        },
        "model": {"kind": "mlp"},
    }
)
KEY = "t/drop.csv"


def typed(**cols) -> pd.DataFrame:
    base = {
        "id": ["r1", "r2", "r3", "r4"],
        "n": ["1", "2", "3", "4"],
        "x": ["0.5", "1", "", "2"],
        "cat": ["a", "b", "a", "b"],
        "y": ["0", "1", "0", "1"],
    }
    base.update(cols)
    return coerce_types(pd.DataFrame(base, dtype="str").replace({"": None}), CONTRACT, object_key=KEY)


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(CONTRACT, object_key=KEY)


def test_clean_chunk_passes(validator):
    v = validator.validate_chunk(typed(), row_offset=0)
    assert v.success and not v.warnings and v.rows == 4 and v.checks > 5


def test_failures_name_rows_with_offset_and_index():
    df = typed(n=["1", "200", "3", "-1"], cat=["a", "b", "c", "b"])
    df = df.iloc[1:]  # index labels 1..3 are kept: rows 1001+1 ..
    v = Validator(CONTRACT, object_key=KEY).validate_chunk(df, row_offset=1000)
    by_code = {f.code: f for f in v.failures}
    assert by_code["out_of_range"].rows == [1002, 1004] and by_code["out_of_range"].column == "n"
    assert by_code["out_of_range"].samples[0] == {"row": 1002, "n": 200}
    assert by_code["not_allowed"].rows == [1003] and by_code["not_allowed"].samples == [
        {"row": 1003, "cat": "c"}
    ]
    assert by_code["out_of_range"].expectation == "expect_column_values_to_be_between"


def test_non_critical_column_gives_warnings():
    v = Validator(CONTRACT, object_key=KEY).validate_chunk(typed(x=["-1", "1", "", "2"]))
    assert v.success
    assert [(w.code, w.column, w.rows, w.critical) for w in v.warnings] == [("out_of_range", "x", [1], False)]


def test_null_and_unique_within_chunk():
    v = validate_chunk(typed(id=["r1", "r2", "r1", None]), CONTRACT, object_key=KEY, row_offset=0)
    by_code = {f.code: f for f in v.failures}
    assert by_code["null_value"].rows == [4]
    assert by_code["duplicate_value"].rows == [1, 3]
    assert by_code["duplicate_value"].column == "id" and by_code["duplicate_value"].samples[0]["id"] == "r1"
    assert "r1" in by_code["duplicate_value"].message  # the value, not its hash


def test_missing_values_are_not_duplicates_of_each_other():
    v = validate_chunk(typed(id=["r1", None, None, "r2"]), CONTRACT, object_key=KEY, row_offset=0)
    assert [f.code for f in v.failures] == ["null_value"]


def test_unique_across_chunks():
    val = Validator(CONTRACT, object_key=KEY)
    assert val.validate_chunk(typed(), row_offset=0).success
    second = typed(id=["r9", "r3", "r8", "r7"])
    v = val.validate_chunk(second, row_offset=4)
    (f,) = v.failures
    assert (f.code, f.rows, f.column) == ("duplicate_value", [6], "id")


def test_row_count_is_checked_on_the_total():
    val = Validator(CONTRACT, object_key=KEY)
    val.validate_chunk(typed().iloc[:2], row_offset=0)
    val.validate_chunk(typed(id=["r5", "r6", "r7", "r8"]).iloc[:2], row_offset=2)
    assert val.finish().success  # 4 rows in total, each chunk alone would be below min=3
    assert check_row_count(2, CONTRACT, object_key=KEY).failures[0].code == "too_few_rows"
    assert check_row_count(11, CONTRACT, object_key=KEY).failures[0].code == "too_many_rows"


def test_raise_for_critical_picks_the_earliest_row():
    a = ChunkValidation(
        object_key=KEY, failures=[Failure(code="x", expectation="e", column="n", rows=[50], message="m")]
    )
    b = ChunkValidation(
        object_key=KEY, failures=[Failure(code="y", expectation="e", column="c", rows=[7], message="m")]
    )
    raise_for_critical([ChunkValidation(object_key=KEY)])  # nothing to raise
    with pytest.raises(DropError) as info:
        raise_for_critical([a, b])
    assert (info.value.code, info.value.row, info.value.column) == ("y", 7, "c")
    assert info.value.details["other_critical_failures"] == 1


def test_render_html_escapes_everything():
    f = Failure(
        code="not_allowed",
        expectation="e",
        column="cat",
        rows=[3],
        message="bad <b>",
        samples=[{"row": 3, "cat": "<script>alert(1)</script>"}],
    )
    v = ChunkValidation(object_key=KEY, rows=10, failures=[f], expectations=["cat: in {a, <b>}"])
    err = DropError("not_allowed", "x <i>", file="t/<evil>.csv", row=3, column="cat", samples=f.samples)
    page = render_html([v], "t/<evil>.csv", error=err)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<evil>" not in page and "<b>" not in page and "<i>" not in page
    assert "REJECTED" in page and page.startswith("<!DOCTYPE html>")


def _hostile_report() -> tuple[list[ChunkValidation], str, DropError]:
    """Every part of the page filled in, with markup in a column name, a message, a reason and a sample."""
    evil = "<script>alert(1)</script>"
    f = Failure(
        code="not_allowed",
        expectation="e",
        column=evil,
        rows=[3, 4],
        unexpected_count=2,
        message=f"2 value(s) of {evil!r} are not allowed",
        fix=evil,
        samples=[{"row": 3, evil: evil}, {"row": 4, "other": 1}],
    )
    w = Failure(code="null_value", expectation="e", column="x", critical=False, message="1 missing", rows=[2])
    validations = [
        ChunkValidation(
            object_key=KEY, rows=10, seconds=0.25, failures=[f], warnings=[w], expectations=[evil]
        ),
        ChunkValidation(object_key=KEY, rows=0, seconds=0.01),
    ]
    err = DropError("not_allowed", evil, file=KEY, row=3, column=evil, fix=evil, samples=f.samples)
    return validations, f"t/{evil}.csv", err


def test_render_html_escapes_column_names_reasons_and_samples():
    validations, key, err = _hostile_report()
    page = render_html(validations, key, error=err)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8
    assert "<th>&lt;script&gt;alert(1)&lt;/script&gt;</th>" in page  # a sample's column name: a header
    assert "10 data rows validated in 2 part(s) · 1 critical failure(s) · 1 warning(s) · 0.26 s" in page
    for text in ("Why the file was rejected", "Critical failures", "Warnings", "Checks (from the dataset"):
        assert text in page, text


def test_render_html_passes_and_warnings():
    ok = render_html([ChunkValidation(object_key=KEY, rows=5, expectations=["id: exists"])], KEY)
    assert "<strong>PASSED</strong>" in ok and "<li>id: exists</li>" in ok and "Critical failures" not in ok
    w = Failure(code="null_value", expectation="e", column="x", critical=False, message="m")
    warned = render_html([ChunkValidation(object_key=KEY, rows=5, warnings=[w])], KEY)
    assert "PASSED WITH WARNINGS" in warned and "<td>—</td>" in warned  # no failing rows listed
    assert "<h2>Checks" not in render_html([], KEY)


def test_render_html_template_variables_are_all_required(monkeypatch):
    """StrictUndefined: a template typo, or a variable render_html stops passing, fails the render."""
    import jinja2

    from lepton_tasks import templates

    seen = {}
    real_render = templates.render

    def capture(name, /, **context):
        seen.update(name=name, context=context)
        return real_render(name, **context)

    monkeypatch.setattr(templates, "render", capture)
    validations, key, err = _hostile_report()
    page = render_html(validations, key, error=err)
    assert real_render(seen["name"], **seen["context"]) == page
    for missing in seen["context"]:
        rest = {k: v for k, v in seen["context"].items() if k != missing}
        with pytest.raises(jinja2.UndefinedError, match=missing):
            real_render(seen["name"], **rest)


def test_modules_do_not_import_gx_or_pandas_at_import_time():
    code = (
        "import sys, lepton_tasks.core.drops as d; assert 'pandas' not in sys.modules, 'drops';"
        "import lepton_tasks.ingest.validate, lepton_tasks.ingest.prepare;"
        "assert 'great_expectations' not in sys.modules; assert 'airflow' not in sys.modules;"
        "assert 'pandas' not in sys.modules, 'validate/prepare'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gx_chunk_timing():
    """GX cost per 200k-row chunk on the ecommerce suite (printed; generous bound for slow CI)."""
    from lepton_tasks.ops.scenarios.ecommerce import retailer_frame

    contract = load_contract("ecommerce")
    raw = retailer_frame("retailer_a", 0, 200_000)
    df = coerce_types(raw.astype({"price": "str"}), contract, object_key="ecommerce/x.csv")
    val = Validator(contract, object_key="ecommerce/x.csv")
    val.validate_chunk(df.iloc[:1000], row_offset=0)  # warm-up
    started = time.perf_counter()
    v = val.validate_chunk(df.iloc[1000:], row_offset=1000)
    seconds = time.perf_counter() - started
    print(f"GX validation of {len(df) - 1000} rows: {seconds:.3f} s")
    assert v.success, v.failures
    assert seconds < 20
    assert np.isfinite(v.seconds)
