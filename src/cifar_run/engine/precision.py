"""The `precision` key: the autocast dtype of training and evaluation on a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_run.constants import PRECISIONS
from cifar_run.errors import UserError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What a `precision` setting resolved to on a device."""

    name: str  # fp32, bf16 or fp16
    dtype: torch.dtype | None  # the autocast dtype; None: plain fp32, no autocast

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return loss_scaler(self.dtype, device)


def loss_scaler(autocast: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A fresh GradScaler for training under `autocast`: fp16 needs loss scaling (its range
    is small); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if autocast == torch.float16 else None


def cpu_has_amx() -> bool:
    """AMX: the CPU's matrix units, where bf16 multiplies run several times faster than fp32.

    AVX-512 BF16 alone is not enough: without AMX, oneDNN's bf16 kernels multiply at about
    half the fp32 rate, so bf16 would slow training down (docs/speed.md)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_amx()
    return False


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto`: bf16 where the device multiplies bf16 faster than fp32 (CUDA from Ampere on,
    CPUs with AMX), fp32 elsewhere. fp16 works on CUDA and on CPU (with a grad
    scaler); it is slower than bf16 on CPUs and not chosen by `auto`."""
    if name not in PRECISIONS:
        raise UserError(f"precision={name}: unknown; allowed: {', '.join(PRECISIONS)}")
    if name == "auto":
        name = "bf16" if bf16_is_fast(device) else "fp32"
    return Precision(name, _DTYPES[name])
