"""A run or sweep folder in use: an advisory lock on FOLDER/.lock while a cifar-run writes there.

The lock is flock(2) on the open file, so the kernel drops it when its process ends, however it
ends (SIGKILL included): a killed run never leaves a stale lock, and the file itself may stay.
The holder writes its pid into the file, for the line that refuses another process. The
descriptor is not inherited by the processes a run starts (Python opens it close-on-exec).
(locks.py has the plain locks between a sweep's jobs; this one names its holder in a refusal.)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar_run.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# `refuse_if_in_use` holds a lock for an instant to test it; a process that meets such a test
# tries again for this long before it takes the lock for another run's.
RETRY_SECONDS = 0.5
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems without flock

_held: dict[str, int] = {}  # the folders this process holds: real path -> descriptor


class FolderInUse(UserError):
    """Another process holds the folder's lock: the message names the folder and its pid."""


def _key(folder: str | os.PathLike) -> str:
    return os.path.realpath(folder)


def holds(folder: str | os.PathLike) -> bool:
    """Whether this process holds `folder`'s lock."""
    return _key(folder) in _held


def _holder_pid(folder: Path) -> str:
    # The holder writes its pid right after it takes the lock: wait a moment for it.
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            pid = (folder / LOCK_FILE).read_text().strip()
        except OSError:
            pid = ""
        if pid or time.monotonic() >= deadline:
            return pid or "unknown"
        time.sleep(0.02)


def _in_use(folder: Path, key: str) -> FolderInUse:
    return FolderInUse(
        f"{key}={folder}: in use by another cifar-run (pid {_holder_pid(folder)}); wait for it "
        f"to end, or choose another {key}"
    )


def acquire(folder: str | os.PathLike, key: str) -> bool:
    """Lock `folder` (created if missing) for this process until `release` or its end.
    Returns False if this process held it already; FolderInUse if another one does.
    `key` is the config key that named the folder, for the message."""
    folder = Path(folder)
    if holds(folder):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + RETRY_SECONDS
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _in_use(folder, key) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            log.warning("%s: cannot lock %s here (%s); not guarded", key, folder, exc.strerror)
            return False
        raise
    except BaseException:
        os.close(fd)
        raise
    _held[_key(folder)] = fd
    return True


def release(folder: str | os.PathLike) -> None:
    """Drop this process's lock of `folder` (closing the descriptor drops it)."""
    fd = _held.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)


@contextmanager
def held(folder: str | os.PathLike, key: str) -> Iterator[None]:
    """`folder` locked while the block runs; left locked after it if this process held it
    before (a run whose folder the CLI locked before Hydra wrote into it)."""
    taken = acquire(folder, key)
    try:
        yield
    finally:
        if taken:
            release(folder)


def refuse_if_in_use(folder: str | os.PathLike, key: str) -> None:
    """FolderInUse if another process holds `folder`'s lock; creates and changes nothing."""
    folder = Path(folder)
    if holds(folder):
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (a new folder), or none this user may read: not in use
        return
    try:
        # A shared lock, at once given back: tests do not refuse each other.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, key) from None
    except OSError:  # a file system without locks: nothing to test
        pass
    finally:
        os.close(fd)
