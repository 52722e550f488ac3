"""Validate drops against their contract with Great Expectations (GX 1.x), chunk by chunk.

The expectation suite is built **from the contract at run time** in an *ephemeral* GX context, once per drop
(:class:`Validator`), and reused for every chunk — never at import time (GX takes seconds to import, so it is
imported lazily; this module's top level is standard library only and safe to import from DAG files).

Expectations per contract column (on the output of :func:`lepton_tasks.ingest.clean.coerce_types`, which
already enforced the dtypes and named any bad value):

* ``expect_column_to_exist``;
* ``expect_column_values_to_not_be_null`` unless ``nullable``;
* ``expect_column_values_to_be_between`` for ``min``/``max`` (numeric columns);
* ``expect_column_values_to_be_in_set`` for ``allowed``;
* ``expect_column_values_to_be_unique`` for ``unique`` — within a chunk by GX, and across the chunks of the
  drop by the :class:`Validator` (hashes of the values seen so far). GX checks the chunk's uniqueness on the
  column's 64-bit value hashes (an extra ``UInt64`` column, null where the value is null), which the drop's
  hash sets compute anyway: ~10x cheaper than GX factorizing the strings, and reported against the original
  column and values;
* the row-count bounds (``contract.rows``) are checked once on the **total** at :meth:`Validator.finish`.

A failure on a ``critical`` column is critical (the drop is quarantined by :func:`raise_for_critical`);
otherwise it is a warning. Failing rows are reported as 1-based file rows: ``row_offset + index + 1`` (keep
the reader's index; filtered frames keep their labels).

Cost: GX's import takes ~2.5 s once per process; building the context+suite ~20 ms per drop; validating one
chunk of 200,000 rows against the 7-column ``ecommerce`` suite takes ~0.15–0.3 s on one core (measured by
``tests/unit/test_validate.py::test_gx_chunk_timing``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lepton_tasks.core.contracts import Contract
from lepton_tasks.core.drops import MAX_SAMPLES, DropError, cap_list, clip_text

if TYPE_CHECKING:
    import pandas as pd

    from lepton_tasks.core.hashing import ChunkHashes

__all__ = [
    "ChunkValidation",
    "Failure",
    "Validator",
    "check_row_count",
    "raise_for_critical",
    "render_html",
    "validate_chunk",
]

_QUICK_FORMAT = {"result_format": "BOOLEAN_ONLY"}
_UNIQUE_KEY = "lepton-unique-v1"  # 16 bytes: siphash key when no ChunkHashes is given
_HASH_ALIAS = "__lepton_value_hash__"  # + column name: the column GX checks uniqueness on


#: GX loggers whose INFO lines are noise in a task log: ``_docs_decorators`` logs ~220 "Skipping registering
#: function …" lines while GX is imported. Their warnings and errors still come through.
_NOISY_GX_LOGGERS = ("great_expectations._docs_decorators",)


def _quiet_gx_logs() -> None:
    """Raise the noisy GX loggers to WARNING; called before GX is imported (repeats are free)."""
    import logging

    for name in _NOISY_GX_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _unalias(column: str | None) -> str | None:
    return column[len(_HASH_ALIAS) :] if column and column.startswith(_HASH_ALIAS) else column


_RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": 20,
    "return_unexpected_index_query": False,
}


class Failure(BaseModel):
    """One failed expectation (critical or warning) with up to 5 failing rows."""

    code: str  # null_value, out_of_range, not_allowed, duplicate_value, too_few_rows, too_many_rows, gx_error
    expectation: str
    column: str | None = None
    critical: bool = True
    unexpected_count: int = 0
    rows: list[int] = Field(default_factory=list)
    samples: list[dict[str, Any]] = Field(default_factory=list)
    message: str
    fix: str = ""

    def to_error(self, object_key: str) -> DropError:
        return DropError(
            self.code,
            self.message,
            file=object_key,
            row=self.rows[0] if self.rows else None,
            column=self.column,
            fix=self.fix,
            samples=self.samples,
            details={"expectation": self.expectation, "unexpected_count": self.unexpected_count},
        )


class ChunkValidation(BaseModel):
    """The validation result of one chunk (or of the drop-level checks made at :meth:`Validator.finish`)."""

    object_key: str
    row_offset: int = 0
    rows: int = 0
    checks: int = 0
    failures: list[Failure] = Field(default_factory=list)
    warnings: list[Failure] = Field(default_factory=list)
    seconds: float = 0.0
    expectations: list[str] = Field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures


def _sample(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError):
            value = item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        return clip_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    return None if text in ("<NA>", "NaT", "nan", "None") else clip_text(text)


def _describe(spec_min: float | None, spec_max: float | None) -> str:
    if spec_min is not None and spec_max is not None:
        return f"between {spec_min:g} and {spec_max:g}"
    if spec_min is not None:
        return f"at least {spec_min:g}"
    return f"at most {spec_max:g}"


class Validator:
    """Holds one ephemeral GX context and the contract's suite for ONE drop; validate its chunks in order."""

    def __init__(self, contract: Contract, *, object_key: str, spill_dir: str | None = None) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        _quiet_gx_logs()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.execution_engine import pandas_execution_engine

        # GX fingerprints every in-memory batch below HASH_THRESHOLD bytes with an md5 over
        # pd.util.hash_pandas_object, twice per validation (~15% of the whole ingest path, measured with
        # cProfile on 1M rows). The fingerprint is only a batch marker; Lepton's batches are transient chunks.
        pandas_execution_engine.HASH_THRESHOLD = 0

        from lepton_tasks.core.hashing import SeenHashes, column_hash

        self._column_hash = column_hash

        self.contract = contract
        self.object_key = object_key
        self.validations: list[ChunkValidation] = []
        self._rows_seen = 0
        self._seen = {c: SeenHashes(tmp_dir=spill_dir) for c, s in contract.columns.items() if s.unique}
        self._context = gx.get_context(mode="ephemeral")
        self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self._context.data_sources.add_pandas(name="lepton")
        asset = source.add_dataframe_asset(name="drop")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("chunk")
        suite = gx.ExpectationSuite(name=f"{contract.version_tag}")
        E = gx.expectations
        self._described: list[str] = []
        for column, spec in contract.columns.items():
            suite.add_expectation(E.ExpectColumnToExist(column=column))
            self._described.append(f"{column}: exists")
            if not spec.nullable:
                suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column))
                self._described.append(f"{column}: not null")
            if (spec.min is not None or spec.max is not None) and spec.dtype in ("int", "float"):
                suite.add_expectation(
                    E.ExpectColumnValuesToBeBetween(column=column, min_value=spec.min, max_value=spec.max)
                )
                self._described.append(f"{column}: {_describe(spec.min, spec.max)}")
            if spec.allowed is not None:
                suite.add_expectation(
                    E.ExpectColumnValuesToBeInSet(column=column, value_set=list(spec.allowed))
                )
                self._described.append(f"{column}: in {{{cap_list(spec.allowed)}}}")
            if spec.unique:
                suite.add_expectation(E.ExpectColumnValuesToBeUnique(column=_HASH_ALIAS + column))
                self._described.append(f"{column}: unique (across the whole drop)")
        self._described.append(f"rows: between {contract.rows.min} and {contract.rows.max} (whole drop)")
        self._suite = self._context.suites.add(suite)

    # ------------------------------------------------------------------------------------------- chunks

    def validate_chunk(
        self, df: pd.DataFrame, *, row_offset: int = 0, hashes: ChunkHashes | None = None
    ) -> ChunkValidation:
        """Validate one (type-coerced) chunk; rows are numbered ``row_offset + index + 1``.

        GX runs with ``BOOLEAN_ONLY`` results first (pass/fail per expectation: the cheap common case); only
        a chunk that fails is validated again with ``SUMMARY`` results, for counts and failing rows.
        ``hashes`` (the chunk's :class:`~lepton_tasks.core.hashing.ChunkHashes`) reuses column hashes for the
        cross-chunk uniqueness check.
        """
        import numpy as np
        import pandas as pd

        started = time.perf_counter()
        rows = np.asarray(df.index, dtype=np.int64) + int(row_offset) + 1
        frame = df.reset_index(drop=True)  # GX 1.24 misaligns results on a non-default index
        value_hashes = {}
        for column in self._seen:
            if hashes is not None:
                value_hashes[column] = hashes.column(column, df.index)
            else:  # every chunk of a drop must take the same branch: the two keys give different hashes
                value_hashes[column] = self._column_hash(frame[column], _UNIQUE_KEY)
        gx_frame = (
            frame.assign(
                **{
                    _HASH_ALIAS + c: pd.arrays.IntegerArray(h, frame[c].isna().to_numpy())
                    for c, h in value_hashes.items()
                }
            )
            if value_hashes
            else frame
        )
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": gx_frame})
        result = batch.validate(self._suite, result_format=_QUICK_FORMAT)
        if not result.success:
            result = batch.validate(self._suite, result_format=_RESULT_FORMAT)
        out = ChunkValidation(
            object_key=self.object_key,
            row_offset=row_offset,
            rows=len(df),
            checks=len(result.results),
            expectations=self._described,
        )
        for r in result.results:
            failure = self._to_failure(r, frame, rows)
            if failure is not None:
                (out.failures if failure.critical else out.warnings).append(failure)
        for column, seen in self._seen.items():
            failure = self._cross_chunk_unique(column, frame, rows, seen, value_hashes[column])
            if failure is not None:
                (out.failures if failure.critical else out.warnings).append(failure)
        self._rows_seen += len(df)
        out.seconds = round(time.perf_counter() - started, 4)
        self.validations.append(out)
        return out

    def _to_failure(self, r: Any, frame: pd.DataFrame, rows: Any) -> Failure | None:
        config = r.expectation_config
        etype = config.type
        column = _unalias(config.kwargs.get("column"))
        spec = self.contract.columns.get(column) if column else None
        critical = spec.critical if spec is not None else True
        info = r.exception_info or {}
        raised = (
            info.get("raised_exception")
            if "raised_exception" in info
            else any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())
        )
        if raised:
            msg = info.get("exception_message") or next(
                (v.get("exception_message") for v in info.values() if isinstance(v, dict)), "unknown error"
            )
            return Failure(
                code="gx_error",
                expectation=etype,
                column=column,
                critical=True,
                message=f"the check {etype} could not run: {msg}",
                fix="This is a Lepton/contract problem, not necessarily the data's: tell the operator.",
            )
        if r.success:
            return None
        res = r.result or {}
        count = int(res.get("unexpected_count") or 0)
        positions = [int(p) for p in (res.get("partial_unexpected_index_list") or [])]
        failing_rows = [int(rows[p]) for p in positions][:MAX_SAMPLES]
        samples = [
            {"row": int(rows[p]), column: _sample(frame[column].iloc[p])} for p in positions[:MAX_SAMPLES]
        ]
        first = samples[0][column] if samples else None
        if etype == "expect_column_to_exist":
            return Failure(
                code="missing_column",
                expectation=etype,
                column=column,
                critical=True,
                message=f"column {column!r} is missing",
                fix=f"Add the column {column!r}.",
            )
        if etype == "expect_column_values_to_not_be_null":
            return Failure(
                code="null_value",
                expectation=etype,
                column=column,
                critical=critical,
                unexpected_count=count,
                rows=failing_rows,
                samples=samples,
                message=f"{count} missing value(s) in the non-nullable column {column!r}",
                fix=f"Fill in every value of {column!r} (empty cells and "
                f"{cap_list((v for v in self.contract.null_values if v), fmt=repr)} count as missing).",
            )
        if etype == "expect_column_values_to_be_between":
            assert spec is not None, f"{etype} is only built from a contract column's min/max"
            bounds = _describe(spec.min, spec.max)
            return Failure(
                code="out_of_range",
                expectation=etype,
                column=column,
                critical=critical,
                unexpected_count=count,
                rows=failing_rows,
                samples=samples,
                message=f"{count} value(s) of {column!r} are not {bounds}, e.g. {first!r}",
                fix=f"Values of {column!r} must be {bounds}.",
            )
        if etype == "expect_column_values_to_be_in_set":
            assert spec is not None, f"{etype} is only built from a contract column's allowed values"
            allowed = cap_list(spec.allowed or [], fmt=repr)
            return Failure(
                code="not_allowed",
                expectation=etype,
                column=column,
                critical=critical,
                unexpected_count=count,
                rows=failing_rows,
                samples=samples,
                message=f"{count} value(s) of {column!r} are not allowed, e.g. {first!r}",
                fix=f"Use only {allowed} in {column!r} (case-sensitive).",
            )
        if etype == "expect_column_values_to_be_unique":
            return Failure(
                code="duplicate_value",
                expectation=etype,
                column=column,
                critical=critical,
                unexpected_count=count,
                rows=failing_rows,
                samples=samples,
                message=f"{count} rows share a value of the unique column {column!r}, e.g. {first!r}",
                fix=f"Every value of {column!r} must appear once per file.",
            )
        return Failure(  # pragma: no cover - every expectation we build is handled above
            code="failed_expectation",
            expectation=etype,
            column=column,
            critical=critical,
            unexpected_count=count,
            rows=failing_rows,
            samples=samples,
            message=f"{etype} failed on {column!r}",
        )

    def _cross_chunk_unique(
        self, column: str, frame: pd.DataFrame, rows: Any, seen: Any, h: Any
    ) -> Failure | None:
        import numpy as np

        present = frame[column].notna().to_numpy()
        dup = np.zeros(len(h), dtype=bool)
        dup[present] = seen.add_new(h[present], within=False)  # repeats inside the chunk: GX reports them
        if not dup.any():
            return None
        positions = np.flatnonzero(dup)
        spec = self.contract.columns[column]
        samples = [
            {"row": int(rows[p]), column: _sample(frame[column].iloc[p])} for p in positions[:MAX_SAMPLES]
        ]
        return Failure(
            code="duplicate_value",
            expectation="expect_column_values_to_be_unique (across chunks)",
            column=column,
            critical=spec.critical,
            unexpected_count=int(dup.sum()),
            rows=[int(rows[p]) for p in positions[:MAX_SAMPLES]],
            samples=samples,
            message=f"{int(dup.sum())} value(s) of the unique column {column!r} already appeared earlier in "
            f"the file, e.g. {samples[0][column]!r}",
            fix=f"Every value of {column!r} must appear once per file.",
        )

    # --------------------------------------------------------------------------------------------- drop

    def finish(self, total_rows: int | None = None) -> ChunkValidation:
        """Drop-level checks after the last chunk: row-count bounds on the total (default: rows validated)."""
        total = self._rows_seen if total_rows is None else total_rows
        out = check_row_count(total, self.contract, object_key=self.object_key)
        self.validations.append(out)
        self.close()
        return out

    def close(self) -> None:
        """Free the cross-chunk uniqueness state (and its spill files on disk)."""
        for seen in self._seen.values():
            seen.close()


def check_row_count(total_rows: int, contract: Contract, *, object_key: str) -> ChunkValidation:
    """The contract's row-count bounds on a drop's total number of data rows."""
    out = ChunkValidation(object_key=object_key, rows=0, checks=1, expectations=["rows: total within bounds"])
    lo, hi = contract.rows.min, contract.rows.max
    if total_rows < lo:
        out.failures.append(
            Failure(
                code="too_few_rows",
                expectation="expect_table_row_count_to_be_between (whole drop)",
                message=f"the file has {total_rows} data row(s); the {contract.version_tag} contract needs "
                f"at least {lo}",
                fix=f"Send files with at least {lo} rows (batch small exports together).",
            )
        )
    elif total_rows > hi:
        out.failures.append(
            Failure(
                code="too_many_rows",
                expectation="expect_table_row_count_to_be_between (whole drop)",
                message=f"the file has {total_rows} data rows; the {contract.version_tag} contract allows at "
                f"most {hi}",
                fix=f"Split the export into files of at most {hi} rows.",
            )
        )
    return out


def validate_chunk(
    df: pd.DataFrame, contract: Contract, *, object_key: str, row_offset: int = 0
) -> ChunkValidation:
    """Validate one chunk with a fresh :class:`Validator` (convenience; a whole drop keeps one Validator)."""
    return Validator(contract, object_key=object_key).validate_chunk(df, row_offset=row_offset)


def _first_row(f: Failure) -> int:
    return f.rows[0] if f.rows else -1  # drop-level failures (no row) first: they concern the whole file


def raise_for_critical(
    validations: ChunkValidation | Iterable[ChunkValidation], *, object_key: str | None = None
) -> None:
    """Raise :class:`DropError` for the most relevant critical failure: the one at the earliest row."""
    items = [validations] if isinstance(validations, ChunkValidation) else list(validations)
    failures = [(v, f) for v in items for f in v.failures]
    if not failures:
        return
    v, f = min(failures, key=lambda vf: _first_row(vf[1]))
    err = f.to_error(object_key or v.object_key)
    others = len(failures) - 1
    if others:
        err.details["other_critical_failures"] = others
    raise err


_REPORT_TEMPLATE = "validation_report.html"  # in lepton_tasks/templates/


def render_html(
    validations: Iterable[ChunkValidation], object_key: str, *, error: DropError | None = None
) -> str:
    """A self-contained, readable HTML validation report.

    The page is the Jinja2 template ``lepton_tasks/templates/validation_report.html``, rendered with
    autoescape (every value is text, never markup) and ``StrictUndefined``: see :mod:`lepton_tasks.templates`.
    Jinja2 is imported on the first call, not with this module.
    """
    from lepton_tasks import templates

    items = list(validations)
    rows = sum(v.rows for v in items)
    failures = [f for v in items for f in v.failures]
    warnings = [f for v in items for f in v.warnings]
    seconds = sum(v.seconds for v in items)
    status = "REJECTED" if (failures or error) else ("PASSED WITH WARNINGS" if warnings else "PASSED")
    color = {"REJECTED": "#b00020", "PASSED WITH WARNINGS": "#a15c00", "PASSED": "#1b5e20"}[status]
    expectations = next((v.expectations for v in items if v.rows), items[0].expectations if items else [])
    error_rows = None
    if error is not None:
        error_rows = [
            ("check", str(error.code)),
            ("row", str(error.row if error.row is not None else "—")),
            ("column", str(error.column if error.column is not None else "—")),
            ("problem", str(error.message)),
            ("how to fix", str(error.fix)),
        ]
    return templates.render(
        _REPORT_TEMPLATE,
        object_key=str(object_key),
        status=status,
        color=color,
        rows=rows,
        parts=len(items),
        n_failures=len(failures),
        n_warnings=len(warnings),
        seconds=seconds,
        error=error_rows,
        error_samples=_samples_table(error.samples) if error is not None and error.samples else None,
        groups=[
            (title, [_failure_row(f) for f in group])
            for title, group in (("Critical failures", failures), ("Warnings", warnings))
            if group
        ],
        expectations=[str(e) for e in expectations],
    )


def _failure_row(f: Failure) -> dict[str, Any]:
    """One row of a failures table, as plain text (the template escapes it)."""
    return {
        "code": f.code,
        "column": f.column or "—",
        "count": f.unexpected_count,
        "rows": ", ".join(map(str, f.rows)) or "—",
        "message": f.message,
        "fix": f.fix,
        "samples": "; ".join(", ".join(f"{k}={v!r}" for k, v in s.items()) for s in f.samples),
    }


def _samples_table(samples: list[dict[str, Any]]) -> dict[str, list]:
    """``{"columns": [...], "rows": [[...]]}`` of sample rows (a key missing from a sample: empty cell)."""
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s if k not in keys]
    return {"columns": [str(k) for k in keys], "rows": [[str(s.get(k, "")) for k in keys] for s in samples]}
