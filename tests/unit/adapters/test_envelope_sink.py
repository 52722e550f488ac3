"""The envelope's ciphertext sink: hashing and writing on background threads equal a plain write + SHA-256."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from lepton_tasks.adapters.envelope import EnvelopeError, _HashingWriter


def test_sink_writes_and_hashes_every_byte_in_order(tmp_path):
    pieces = [os.urandom(n) for n in (1, 131072, 7, 300_000, 131072 * 3, 0, 5)]
    dst = tmp_path / "out.bin"
    with open(dst, "wb") as f:
        sink = _HashingWriter(f, batch=200_000, depth=2)  # small batches: many hand-offs, a full queue
        for p in pieces:
            assert sink.write(memoryview(p)) == len(p)
        digest = sink.finish()
        sink.close()
    expected = b"".join(pieces)
    assert dst.read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()


class _FailingFile(io.RawIOBase):
    def __init__(self, fail_after: int) -> None:
        self.written = 0
        self.fail_after = fail_after

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        if self.written >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.written += len(b)
        return len(b)


def test_a_write_error_is_raised_not_lost():
    sink = _HashingWriter(_FailingFile(fail_after=1_000_000), batch=100_000, depth=2)
    with pytest.raises(OSError, match="No space left on device"):
        for _ in range(200):  # 20 MB: far past the failure
            sink.write(b"x" * 100_000)
    sink.close()  # no hang, no second error


def test_a_hashing_error_on_the_thread_is_raised_not_lost(tmp_path):
    class Broken:
        def update(self, b: bytes) -> None:
            raise MemoryError("hasher failed")

    with open(tmp_path / "o", "wb") as f:
        sink = _HashingWriter(f, batch=10, depth=1)
        sink._sha256 = Broken()  # type: ignore[assignment]
        with pytest.raises(EnvelopeError, match="hasher failed"):
            for _ in range(100):
                sink.write(b"y" * 100)
            sink.finish()
        sink.close()


def test_close_without_finish_stops_the_threads(tmp_path):
    with open(tmp_path / "o", "wb") as f:
        sink = _HashingWriter(f)
        sink.write(b"abc")
        sink.close()
    assert not sink._thread.is_alive()
