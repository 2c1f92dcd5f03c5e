"""CPU thread counts: the process's setting (the `threads` key) and a count for a block of
code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def set_threads(threads: int | None) -> int:
    """Intra-op threads for CPU ops: `threads`, or torch's default (every physical core, or
    OMP_NUM_THREADS when set, as joblib sweeps do) when None. Returns the number in use.

    Inter-op threads stay at one: nothing here runs independent ops side by side, and a
    second pool would only compete for the same cores.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work of the process
        pass
    return torch.get_num_threads()


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """CPU ops inside run on `count` threads; the count in use before comes back on exit.
    A count already in use is not set again: every set clears oneDNN's cache of the
    thread's convolutions."""
    threads = torch.get_num_threads()
    if count != threads:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
