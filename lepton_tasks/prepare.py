"""Prepare one drop: read → coerce → deduplicate → validate → clean → split → statistics, chunk by chunk.

This is what the Airflow ingest task calls between downloading a drop and encrypting it::

    prepared = prepare_drop(local_path, load_contract("banks"), object_key="banks/2024-06.csv", out_dir=tmp)
    # prepared.train_path / prepared.holdout_path: cleaned, typed Parquet (never the raw file)
    # prepared.stats: SufficientStats of the TRAINING rows only (the federated normalization input)

Memory stays bounded: each chunk of ``chunk_rows`` rows is processed and appended to two Parquet files with
``pyarrow.parquet.ParquetWriter``; the per-drop hash sets (exact duplicates, ``unique`` columns) keep at most
2 M hashes in RAM and spill the rest to a sorted run file in ``out_dir``
(:class:`lepton_tasks.hashing.SeenHashes`). On a critical problem it raises
:class:`~lepton_tasks.drops.DropError` (with ``validation_html`` attached for the quarantine) and leaves no
partial output behind.

Order of steps per chunk, and why: types are coerced first so every later message can name a typed value;
exact duplicate rows are removed *before* validation so a re-sent identical row is cleaned, not rejected by the
uniqueness check (a duplicate id with different content is still rejected); validation runs on every row that
will be kept; cleaning (missing policy, clipping) runs on validated rows; the split is a per-row hash, so it
does not depend on chunking.

Top-level imports are standard library only (safe for DAG files); the heavy modules load inside the function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lepton_tasks.drops import DropError

if TYPE_CHECKING:
    import pyarrow as pa

    from lepton_tasks.clean import CleaningReport
    from lepton_tasks.contracts import Contract
    from lepton_tasks.normalize import SufficientStats
    from lepton_tasks.validate import ChunkValidation, Failure

__all__ = ["CHUNK_ROWS", "PreparedDrop", "arrow_schema", "prepare_drop", "process_file"]

log = logging.getLogger(__name__)


@dataclass
class PreparedDrop:
    """The outputs of :func:`prepare_drop` for one drop."""

    object_key: str
    dataset: str
    train_path: Path
    holdout_path: Path
    rows_in: int
    rows_train: int
    rows_holdout: int
    report: CleaningReport
    stats: SufficientStats
    warnings: list[Failure] = field(default_factory=list)
    validation_html: str = ""
    validations: list[ChunkValidation] = field(default_factory=list)


def arrow_schema(contract: Contract) -> pa.Schema:
    """The Arrow schema of cleaned, typed rows of ``contract`` (what the staged Parquet files contain)."""
    import pyarrow as pa

    types = {
        "int": pa.int64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "string": pa.string(),
        "category": pa.string(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema(
        [pa.field(c, types[s.dtype], nullable=True) for c, s in contract.columns.items()],
        metadata={b"lepton.contract": contract.version_tag.encode()},
    )


#: rows per chunk: big enough to amortize GX's per-validation overhead, small enough to bound memory
CHUNK_ROWS = 500_000


def prepare_drop(
    path: Path,
    contract: Contract,
    *,
    object_key: str,
    out_dir: Path,
    chunk_rows: int = CHUNK_ROWS,
    salt: str = "",
) -> PreparedDrop:
    """Validate, clean and split the drop at ``path``; write ``train.parquet``/``holdout.parquet`` to ``out_dir``.

    Raises :class:`DropError` for the first critical problem (bad file, bad type, failed critical expectation,
    row count out of bounds).

    A CSV is first read in *typed* mode (Arrow converts the cells while parsing, on all cores). If Arrow
    cannot convert some cell, the file is processed again from the start in string mode, where
    :func:`~lepton_tasks.clean.coerce_types` either accepts the value (string mode is more lenient: spaces
    around numbers, ``1.0`` for an int, naive timestamps) or names its row, column and value. Both modes give
    the same output for the same file (``tests/unit/test_prepare.py``).
    """
    from lepton_tasks.readers import TypedParseFallback

    kw = {"object_key": object_key, "out_dir": out_dir, "chunk_rows": chunk_rows, "salt": salt}
    try:
        return _prepare(path, contract, typed=True, **kw)
    except TypedParseFallback as why:
        log.info("%s: typed read stopped (%s); reading it again as text to name the value", object_key, why)
        return _prepare(path, contract, typed=False, **kw)


def _prepare(
    path: Path,
    contract: Contract,
    *,
    object_key: str,
    out_dir: Path,
    chunk_rows: int,
    salt: str,
    typed: bool,
) -> PreparedDrop:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_tasks.clean import Cleaner, coerce_types
    from lepton_tasks.hashing import ChunkHashes
    from lepton_tasks.normalize import SufficientStats
    from lepton_tasks.readers import iter_chunks
    from lepton_tasks.split import holdout_mask
    from lepton_tasks.validate import Validator, raise_for_critical, render_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, holdout_path = out_dir / "train.parquet", out_dir / "holdout.parquet"
    schema = arrow_schema(contract)
    validator: Validator | None = None
    cleaner = Cleaner(contract, object_key=object_key, spill_dir=str(out_dir))
    stats = SufficientStats.empty(contract)
    rows_in = rows_train = rows_holdout = 0
    writers = {
        "train": pq.ParquetWriter(train_path, schema, compression="zstd"),
        "holdout": pq.ParquetWriter(holdout_path, schema, compression="zstd"),
    }

    def write(kind: str, frame) -> None:
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        writers[kind].write_table(table)

    try:
        try:
            chunks = iter_chunks(path, contract, object_key=object_key, chunk_rows=chunk_rows, typed=typed)
            for chunk in chunks:
                offset = chunk.attrs.get("row_offset", rows_in)
                rows_in += len(chunk)
                frame = coerce_types(chunk, contract, object_key=object_key, row_offset=offset)
                hashes = ChunkHashes(frame, salt=salt)
                frame = cleaner.drop_duplicates(frame, hashes)
                if validator is None:
                    validator = Validator(contract, object_key=object_key, spill_dir=str(out_dir))
                result = validator.validate_chunk(frame, row_offset=offset, hashes=hashes)
                raise_for_critical(result, object_key=object_key)
                cleaned = cleaner.apply(frame)
                if cleaned.empty:
                    continue
                mask = holdout_mask(cleaned, contract, salt=salt, hashes=hashes)
                train, holdout = cleaned[~mask], cleaned[mask]
                if len(train):
                    write("train", train)
                    stats.update(train, contract)
                if len(holdout):
                    write("holdout", holdout)
                rows_train += len(train)
                rows_holdout += len(holdout)
            if validator is None:  # pragma: no cover - iter_chunks raises no_data_rows first
                validator = Validator(contract, object_key=object_key)
            raise_for_critical(validator.finish(total_rows=rows_in), object_key=object_key)
        except DropError as err:
            err.validation_html = render_html(
                validator.validations if validator else [], object_key, error=err
            )
            raise
    except BaseException:
        cleaner.close()
        if validator is not None:
            validator.close()
        for w in writers.values():
            w.close()
        train_path.unlink(missing_ok=True)
        holdout_path.unlink(missing_ok=True)
        raise
    cleaner.close()
    for w in writers.values():
        w.close()
    warnings = [w for v in validator.validations for w in v.warnings]
    return PreparedDrop(
        object_key=object_key,
        dataset=contract.name,
        train_path=train_path,
        holdout_path=holdout_path,
        rows_in=rows_in,
        rows_train=rows_train,
        rows_holdout=rows_holdout,
        report=cleaner.report,
        stats=stats,
        warnings=warnings,
        validation_html=render_html(validator.validations, object_key),
        validations=validator.validations,
    )


def process_file(path: Path, contract: Contract, object_key: str, *, chunk_rows: int = CHUNK_ROWS):
    """Convenience for tests and notebooks: :func:`prepare_drop` into a temporary folder, frames read back.

    Returns ``(train_df, holdout_df, report, stats, validations)``. Holds both splits in memory: use
    :func:`prepare_drop` for real drops.
    """
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="lepton-prepare-") as tmp:
        prepared = prepare_drop(
            path, contract, object_key=object_key, out_dir=Path(tmp), chunk_rows=chunk_rows
        )
        train = pd.read_parquet(prepared.train_path)
        holdout = pd.read_parquet(prepared.holdout_path)
    return train, holdout, prepared.report, prepared.stats, prepared.validations
