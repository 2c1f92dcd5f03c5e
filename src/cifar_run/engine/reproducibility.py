"""Deterministic kernels and every random number generator's state, as plain tensors.

The states are tensors, ints, floats and None only, so a checkpoint holding them loads with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# cuBLAS needs a fixed workspace for deterministic results (torch's "Reproducibility" notes;
# ":4096:8" is the larger of the two documented values). Read when cuBLAS starts, so it is set
# before the first CUDA matrix multiply of the process.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_deterministic(enabled: bool) -> None:
    """`deterministic=true`: deterministic algorithms wherever torch has them.

    An op with no deterministic implementation (some CUDA backward passes, e.g. adaptive
    average pooling) warns, naming itself, rather than stopping the run: "as far as torch
    allows". On the CPU every op the models use is deterministic.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    # Otherwise cuDNN times its kernels for each new input shape once and keeps the fastest
    # (CIFAR batches have one shape, plus the last one); autotuning may pick different
    # kernels per run, so not when deterministic.
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """torch (CPU and, once initialised, CUDA), numpy, Python `random` and `generators`."""
    version, mt, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore what `rng_state` captured; `generators` must have the same names."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        # Another machine may have fewer GPUs; the run's own device is among the first.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def environment(device: torch.device) -> dict[str, str | None]:
    """The software and hardware a run ran on (results.json's `environment`): the same
    seed gives the same numbers only with the same versions, and timings are the machine's."""
    from cifar_run import __version__

    return {
        "cifar_run": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _installed_version("torchvision"),
        "hydra": _installed_version("hydra-core"),
        "cpu": _cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    # platform.processor() is empty or just the architecture on Linux; cpuinfo names the model.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
