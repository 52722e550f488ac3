"""The background reader/writer of prepare: order, errors in order, bounded look-ahead, clean stop."""

from __future__ import annotations

import threading
import time

import pytest

from lepton_tasks.ingest.prepare import _BackgroundWriter, _Prefetch


def test_prefetch_keeps_order_and_raises_the_error_after_the_items_before_it():
    def gen():
        yield from range(5)
        raise ValueError("row 6: bad")

    it = _Prefetch(gen)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="row 6"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_reads_at_most_depth_items_ahead_and_close_stops_the_source():
    produced: list[int] = []
    closed = threading.Event()

    def gen():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = _Prefetch(gen, depth=1)
    assert next(it) == 0
    time.sleep(0.3)  # time for the producer to run ahead, if it (wrongly) could
    assert len(produced) <= 2  # the item held + one ahead
    it.close()
    assert closed.is_set() and len(produced) <= 3


class _Sink:
    def __init__(self, fail_on: int | None = None) -> None:
        self.tables: list[tuple[str, object]] = []
        self.closed = False
        self.fail_on = fail_on

    def write_table(self, t: object) -> None:
        if self.fail_on is not None and len(self.tables) == self.fail_on:
            raise OSError("disk full")
        self.tables.append(("x", t))

    def close(self) -> None:
        self.closed = True


def test_background_writer_writes_in_order_and_closes():
    a, b = _Sink(), _Sink()
    w = _BackgroundWriter({"train": a, "holdout": b})
    for i in range(10):
        w.submit("train" if i % 3 else "holdout", i)
    w.close()
    assert [t for _, t in a.tables] == [1, 2, 4, 5, 7, 8] and [t for _, t in b.tables] == [0, 3, 6, 9]
    assert a.closed and b.closed


def test_background_writer_reports_a_write_error():
    a = _Sink(fail_on=2)
    w = _BackgroundWriter({"train": a})
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            w.submit("train", i)
        w.close()
    w.close(check=False)
    assert a.closed
