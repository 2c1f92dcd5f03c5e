"""One GPU per running sweep job on a machine with several.

Parallel jobs (hydra/launcher=parallel) with device=auto each lease a GPU for as long as they
run: a lock file per GPU in the sweep folder (.gpus/cuda<k>.lock). A job takes the first free
GPU, trying its own number's first (job k: GPU k mod N), and waits while every GPU is taken;
so N jobs run at a time, one per GPU, however long each takes, where numbering alone would
put a new job on a GPU still busy with a slow one. A job that ends, however it ends (a killed
process too), frees its GPU.

The job sees its GPU as device cuda:<k> (torch.cuda.set_device in run()). CUDA_VISIBLE_DEVICES
is left alone: joblib reuses its worker processes, and CUDA reads that variable only once per
process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifar_run.outputs import locks

log = logging.getLogger(__name__)

LEASE_DIR = ".gpus"
POLL_SECONDS = 1.0  # how often a job waiting for a GPU looks again


def gpu_count() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parallel_jobs(default: int) -> int:
    """hydra/launcher=parallel's n_jobs: one per GPU on a machine with several, else `default`."""
    count = gpu_count()
    return count if count > 1 else int(default)


@contextmanager
def lease(device: str, sweep_dir: Path, job_num: int, count: int) -> Iterator[str]:
    """The device a sweep job runs on: with `auto` and several GPUs, a GPU of its own (held
    for the block), else `device` unchanged."""
    if device != "auto" or count < 2:
        yield device
        return
    waiting = False
    while True:
        for i in range(count):
            k = (job_num + i) % count
            held = locks.try_exclusive(Path(sweep_dir) / LEASE_DIR / f"cuda{k}.lock")
            if held is None:
                continue
            try:
                yield f"cuda:{k}"
            finally:
                held.close()  # frees the GPU for the next job
            return
        if not waiting:
            log.info("job %d: all %d GPUs are busy; waiting for one to be free", job_num, count)
            waiting = True
        time.sleep(POLL_SECONDS)
