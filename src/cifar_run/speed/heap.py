"""The C heap's settings for training on the CPU: freed memory is kept for the next step.

A CPU training step allocates and frees the same large activations every step (ResNet-18 at
batch 128: several MB each in its first stage). glibc's malloc serves blocks above its mmap
threshold with fresh mappings and gives them back on free, and hands freed memory at the top
of a heap back to the kernel past its trim threshold: so every step the kernel maps and zeroes
those pages again, one minor page fault per 4 KB page. Kept in the heap, the blocks are
reused without faults, and a large net's step spends less time in the kernel (docs/speed.md).
LeNet-5's tensors are too small to be affected.

The cost: the process keeps its peak heap instead of returning memory between steps, so its
peak resident memory is somewhat higher. Only glibc on Linux has these knobs; an environment
that sets glibc's own malloc variables keeps them.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above half its largest per-thread heap: 32 MB on 64-bit.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30  # free memory at a heap's top is kept up to this much
TOP_PAD = 64 << 20  # a heap grows in steps of at least this much (fewer sbrk/mprotect calls)

SETTINGS = {
    M_MMAP_THRESHOLD: MMAP_THRESHOLD,
    M_TRIM_THRESHOLD: TRIM_THRESHOLD,
    M_TOP_PAD: TOP_PAD,
}

# Set in the environment, these mean the user chose the heap's behaviour: leave it alone.
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_chose(environ: Mapping[str, str]) -> bool:
    return any(v in environ for v in USER_VARIABLES) or "glibc.malloc." in environ.get(
        "GLIBC_TUNABLES", ""
    )


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Keep freed blocks of up to 32 MB in the process's heaps for reuse, instead of
    returning them to the kernel (module doc). Returns whether the settings were made: on
    Linux with glibc, unless `environ` (default: os.environ) sets glibc's malloc variables.
    Process-wide and lasting; calling it again changes nothing."""
    environ = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _user_chose(environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; a value glibc refuses leaves its default in place. Every
    # setting is tried (a list, not a short-circuiting all()).
    results = [mallopt(param, value) for param, value in SETTINGS.items()]
    return all(r == 1 for r in results)
