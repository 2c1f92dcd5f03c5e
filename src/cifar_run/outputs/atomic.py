"""Atomic file writes: a crash at any instant leaves either the old file or the new one.

A write that fails (a full disk, no permission, a read-only file system) leaves the old file
and no temp file, and raises an OSError that names the file written (not its temp file).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Temp files are `.<name>.<random>.tmp` beside their target (see _atomic_write).
TEMP_PATTERN = ".*.tmp"


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` naming `path` where it names no file (a failed write(2)) or a temp file of
    `path` (its creation, os.replace): the same errno and so the same OSError subclass."""
    temp = os.path.basename(str(exc.filename or ""))
    if exc.filename is None or (temp.startswith(f".{path.name}.") and temp.endswith(".tmp")):
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temp file lives in the target folder so os.replace is a same-filesystem rename.
        # It is named before it is created (tempfile.mkstemp names it only on return), so an
        # exception between its creation and that return, Ctrl-C's included, still finds it to
        # remove; O_EXCL makes the name this writer's own.
        while tmp is None:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                tmp = None
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete the temp files a killed writer left in `folder` (a SIGKILL between a temp file's
    creation and its rename leaves one); only for a folder no other process writes into."""
    for stale in Path(folder).glob(TEMP_PATTERN):
        with contextlib.suppress(OSError):
            stale.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    _atomic_write(Path(path), lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())
