"""`speed_setup`: the tricks that suit a model on a device, switched by the `speed` group.

Plain values in, one `Speed` out; run.py and scripts/bench.py call it, so the CLI and the
benchmark train the same way. What each trick does, when it applies and what it gains:
docs/speed.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from cifar_run.engine.precision import Precision, resolve_precision
from cifar_run.speed.conv_grad import use_tap_weight_grads
from cifar_run.speed.heap import keep_freed_memory
from cifar_run.speed.interface import PLAIN, ForwardBackward
from cifar_run.speed.settings import AUTO, SpeedSettings


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) batches for conv nets on the CPU and CUDA, else NCHW.

    Only the batches change layout: the model's weights stay NCHW, so state dicts,
    checkpoints and pruning see plain tensors (torch's global pruning flattens weights with
    `view(-1)`, which NHWC weights refuse)."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if not has_conv or device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    return torch.channels_last


def tap_conv_grads(model: nn.Module, device: torch.device, compile: bool = False) -> int:
    """On the CPU, let the model's convolutions run as matrix multiplies on small feature
    maps where that is faster (cifar_run.speed.conv_grad). Returns how many may take that
    route. Not under `compile`: dynamo traces the custom autograd Functions slowly."""
    if device.type != "cpu" or compile:
        return 0
    return use_tap_weight_grads(model)


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile(model)` when enabled, else the model itself. The wrapper shares the
    model's parameters; keep using the original module for state dicts and pruning."""
    return torch.compile(model) if enabled else model


@dataclass
class Speed:
    """What a run needs from the speed layer, resolved for one model on one device."""

    net: nn.Module  # the module to call: compiled, or the model itself
    precision: Precision
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format  # of the batches (the weights stay NCHW)
    settings: SpeedSettings = field(default_factory=SpeedSettings)

    @contextmanager
    def epoch(
        self,
        model: nn.Module,
        autocast: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> Iterator[ForwardBackward]:
        """The loop's step function for one epoch: every trick that remains works on the
        model and the batches, so the step itself is the plain one."""
        with PLAIN.epoch(model, autocast, scaler) as step:
            yield step

    def describe(self) -> str:
        on = [f.name for f in fields(self.settings) if getattr(self.settings, f.name)]
        return ", ".join(on) if on else "plain"


def speed_setup(
    model: nn.Module,
    device: torch.device,
    precision: str,
    compile: bool = False,
    settings: SpeedSettings = AUTO,
) -> Speed:
    """Resolve `precision` and apply the tricks `settings` switch on that suit `model` on
    `device`; compile if asked. Keep `model` for state dicts and pruning."""
    resolved = resolve_precision(precision, device)
    if device.type == "cpu" and settings.keep_heap:
        keep_freed_memory()
    if settings.conv_grads:
        tap_conv_grads(model, device, compile=compile)
    layout = torch.contiguous_format
    if settings.channels_last:
        layout = memory_format(model, device)
    return Speed(
        net=compiled(model, compile),
        precision=resolved,
        scaler=resolved.scaler(device),
        memory_format=layout,
        settings=settings,
    )
