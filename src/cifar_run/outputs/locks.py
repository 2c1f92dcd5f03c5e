"""Advisory file locks between the processes of a sweep (parallel jobs on one machine).

flock locks belong to an open file and end with it, so a killed job never leaves one held.
Where fcntl is missing (Windows) a lock cannot be had: `exclusive` then holds nothing and
`try_exclusive` always succeeds, which is what a machine without parallel sweep jobs needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")  # the caller closes it, which releases the lock


AVAILABLE = fcntl is not None


def acquire(path: str | os.PathLike) -> IO[str]:
    """The lock on `path` (created if missing), waited for: the open file that holds it
    (close it to release)."""
    handle = _open(Path(path))
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


@contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on `path` (created if missing) for the block, waiting for it."""
    handle = acquire(path)
    try:
        yield
    finally:
        handle.close()  # closing the file releases the lock


def try_exclusive(path: str | os.PathLike) -> IO[str] | None:
    """The lock on `path` if free now: the open file that holds it (close it to release),
    else None."""
    handle = _open(Path(path))
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle
