"""How cifar-run stops when it cannot go on: exit statuses and the one line that says why.

Light on purpose (no torch, no Hydra): the entry point and Hydra callbacks use it.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

EXIT_USER_ERROR = 2
# The operating system refused a write (full disk, no permission, read-only): EX_IOERR of
# sysexits.h, apart from user errors (2) and crashes (1).
EXIT_OS_ERROR = 74
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left

NOT_STARTED = "the run had not started: run the command again"

# What to do about the usual refusals.
_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "the file is larger than this system lets a process write (ulimit -f)",
    errno.EACCES: "make the folder writable for this user, or choose another folder",
    errno.EPERM: "make the folder writable for this user, or choose another folder",
    errno.EROFS: "it is on a read-only file system: choose a folder on a writable one",
}


def fail(message: str, prog: str = "cifar-run", status: int = EXIT_USER_ERROR) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def os_error_line(exc: OSError) -> str:
    """`PATH: reason; what to do` for an error of the operating system."""
    reason = exc.strerror or str(exc).strip() or type(exc).__name__
    where = f"{exc.filename}: " if exc.filename else ""
    advice = _ADVICE.get(exc.errno) if exc.errno is not None else None
    return f"{where}{reason}" + (f"; {advice}" if advice else "")


@dataclass
class Where:
    """This process's run (or sweep), for the lines that say how to carry on after Ctrl-C or
    a refused write: the sweep folder once Hydra is about to make it, the run folder once the
    run's code is loaded (cli._hydra_main)."""

    out_dir: Path | None = None
    sweep_dir: str | None = None
    dry_run: bool = False
    main_pid: int | None = None  # the process `cifar-run` runs in (sweep workers are others)


where = Where()
