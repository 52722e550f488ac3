"""Private files written all-or-nothing: what a site or a stack keeps on disk (state, ledgers, policies,
bundles, round secrets) must never be readable by others, nor left half-written by a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write ``data`` to ``path`` atomically, created ``mode`` (0600 by default, never wider in between):
    a fresh temp file in the same folder (``mkstemp``: exclusive, so no link is followed), fsync,
    ``os.replace``, fsync of the folder. A crash leaves the old file or the new one, never half of one.
    The folder is created 0700 when missing."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
