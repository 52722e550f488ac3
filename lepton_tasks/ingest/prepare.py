"""Prepare one drop: read → coerce → deduplicate → validate → clean → split → statistics, chunk by chunk.

This is what the Airflow ingest task calls between downloading a drop and encrypting it::

    prepared = prepare_drop(local_path, load_contract("banks"), object_key="banks/2024-06.csv", out_dir=tmp)
    # prepared.train_path / prepared.holdout_path: cleaned, typed Parquet (never the raw file)
    # prepared.stats: SufficientStats of the TRAINING rows only (the federated normalization input)

Memory stays bounded: each chunk of ``chunk_rows`` rows is processed and appended to two Parquet files with
``pyarrow.parquet.ParquetWriter``; the per-drop hash sets (exact duplicates, ``unique`` columns) keep at most
2 M hashes in RAM and spill the rest to sorted run files in ``out_dir``
(:class:`lepton_tasks.core.hashing.SeenHashes`). Three threads overlap the work: the next chunk is parsed
while this one is validated (:class:`_Prefetch`), Parquet encoding runs behind (:class:`_BackgroundWriter`),
and the hash sets merge their runs in the background. On a critical problem it raises
:class:`~lepton_tasks.core.drops.DropError` (with ``validation_html`` attached for the quarantine) and leaves
no partial output behind.

Order of steps per chunk, and why: types are coerced first so every later message can name a typed value;
exact duplicate rows are removed *before* validation so a re-sent identical row is cleaned, not rejected by
the uniqueness check (a duplicate id with different content is still rejected); validation runs on every row
that will be kept; cleaning (missing policy, clipping) runs on validated rows; the split is a per-row hash, so
it does not depend on chunking.

Top-level imports are standard library only (safe for DAG files); the heavy modules load inside the function.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from lepton_tasks.core.drops import DropError

if TYPE_CHECKING:
    import pyarrow as pa

    from lepton_tasks.core.contracts import Contract
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.ingest.clean import CleaningReport
    from lepton_tasks.ingest.validate import ChunkValidation, Failure

__all__ = ["CHUNK_ROWS", "PreparedDrop", "arrow_schema", "prepare_drop", "process_file"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Prefetch(Iterator[T]):
    """Run an iterator on a background thread, ``depth`` items ahead (Arrow's CSV parse releases the GIL,
    so the next chunk is read while this one is validated). Items and the iterator's exception arrive in
    order; at most ``depth`` items exist beyond the one the consumer holds. :meth:`close` stops the thread,
    which closes the iterator."""

    _DONE = object()

    def __init__(self, make: Callable[[], Iterator[T]], depth: int = 1) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="lepton-prefetch")
        self._thread.start()

    def _slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        it = iter(())  # type: Iterator[T]
        try:
            it = make()
            while self._slot():
                try:
                    item = next(it)
                except StopIteration:
                    self._q.put((self._DONE, None))
                    return
                self._q.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - delivered to the consumer, in order, raised there
            self._q.put((self._DONE, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item, exc = self._q.get()
        if item is self._DONE:
            self._finished = True
            self._thread.join()
            if exc is not None:
                raise exc
            raise StopIteration
        self._slots.release()  # the producer may start on the next item while this one is processed
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _BackgroundWriter:
    """Append tables to Parquet writers on one background thread (Parquet encoding and zstd release the GIL),
    in submission order, at most ``depth`` tables waiting. A write error is raised by the next
    :meth:`submit` or by :meth:`close`."""

    def __init__(self, writers: dict[str, Any], depth: int = 1) -> None:
        self._writers = writers
        self._q: queue.Queue[tuple[str, Any] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="lepton-parquet-writer")
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain: the producer must never block on a dead consumer
            kind, table = job
            try:
                self._writers[kind].write_table(table)
            except BaseException as exc:  # noqa: BLE001 - raised on the producer's thread
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, kind: str, table: Any) -> None:
        self._check()
        self._q.put((kind, table))

    def close(self, *, check: bool = True) -> None:
        """Finish pending writes, close the Parquet writers; raise a write error unless ``check`` is false."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        for w in self._writers.values():
            w.close()
        if check:
            self._check()


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
CHUNK_ROWS = 750_000


def prepare_drop(
    path: Path,
    contract: Contract,
    *,
    object_key: str,
    out_dir: Path,
    chunk_rows: int = CHUNK_ROWS,
    salt: str = "",
) -> PreparedDrop:
    """Validate, clean and split the drop at ``path`` into ``out_dir``/``{train,holdout}.parquet``.

    Raises :class:`DropError` for the first critical problem (bad file, bad type, failed critical expectation,
    row count out of bounds).

    A CSV is first read in *typed* mode (Arrow converts the cells while parsing, on all cores). If Arrow
    cannot convert some cell, the file is processed again from the start in string mode, where
    :func:`~lepton_tasks.ingest.clean.coerce_types` either accepts the value (string mode is more lenient:
    spaces around numbers, ``1.0`` for an int, naive timestamps) or names its row, column and value. Both
    modes give the same output for the same file (``tests/unit/test_prepare.py``).
    """
    from lepton_tasks.ingest.readers import TypedParseFallback

    kw: _PrepareArgs = {"object_key": object_key, "out_dir": out_dir, "chunk_rows": chunk_rows, "salt": salt}
    try:
        return _prepare(path, contract, typed=True, **kw)
    except TypedParseFallback as why:
        log.info("%s: typed read stopped (%s); reading it again as text to name the value", object_key, why)
        return _prepare(path, contract, typed=False, **kw)


class _PrepareArgs(TypedDict):
    """The keyword arguments :func:`prepare_drop` passes to both :func:`_prepare` attempts."""

    object_key: str
    out_dir: Path
    chunk_rows: int
    salt: str


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

    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.hashing import ChunkHashes
    from lepton_tasks.ingest.clean import Cleaner, coerce_types
    from lepton_tasks.ingest.readers import iter_chunks
    from lepton_tasks.ingest.split import holdout_mask
    from lepton_tasks.ingest.validate import Validator, raise_for_critical, render_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, holdout_path = out_dir / "train.parquet", out_dir / "holdout.parquet"
    schema = arrow_schema(contract)
    validator: Validator | None = None
    cleaner = Cleaner(contract, object_key=object_key, spill_dir=str(out_dir))
    stats = SufficientStats.empty(contract)
    rows_in = rows_train = rows_holdout = 0
    writer = _BackgroundWriter(
        {
            "train": pq.ParquetWriter(train_path, schema, compression="zstd"),
            "holdout": pq.ParquetWriter(holdout_path, schema, compression="zstd"),
        }
    )

    def write(kind: str, frame) -> None:
        writer.submit(kind, pa.Table.from_pandas(frame, schema=schema, preserve_index=False))

    chunks: _Prefetch[Any] = _Prefetch(
        lambda: iter_chunks(path, contract, object_key=object_key, chunk_rows=chunk_rows, typed=typed)
    )
    try:
        try:
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
        chunks.close()
        cleaner.close()
        if validator is not None:
            validator.close()
        writer.close(check=False)  # the error being raised is the one to report
        train_path.unlink(missing_ok=True)
        holdout_path.unlink(missing_ok=True)
        raise
    chunks.close()
    cleaner.close()
    try:
        writer.close()
    except BaseException:
        train_path.unlink(missing_ok=True)
        holdout_path.unlink(missing_ok=True)
        raise
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
