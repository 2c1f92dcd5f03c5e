"""`speed_setup`: the tricks that suit a model on a device, switched by the `speed` group.

Plain values in, one `Speed` out; run.py and scripts/bench.py call it, so the CLI and the
benchmark train the same way. What each trick does, when it applies and what it gains:
docs/speed.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from cifar_run.engine.precision import Precision, resolve_precision
from cifar_run.speed.conv_grad import use_tap_weight_grads
from cifar_run.speed.halves import (
    MIN_WEIGHT_REUSE,
    PROCESS_AFTER,
    BatchSplit,
    suits,
    weight_reuse,
)
from cifar_run.speed.heap import keep_freed_memory
from cifar_run.speed.interface import PLAIN, ForwardBackward
from cifar_run.speed.settings import AUTO, SpeedSettings
from cifar_run.speed.threads import (
    ONE_THREAD_BELOW,
    cpu_threads,
    one_cpu_thread,
    one_thread_steps,
    small_ops_on_one_thread,
)


def batch_split(
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    compile: bool = False,
    processes: bool = True,
    process_after: int = PROCESS_AFTER,
    image_shape: tuple[int, ...] = (3, 32, 32),
) -> BatchSplit | None:
    """Halves of each training batch on two threads (cifar_run.speed.halves) where they
    suit: on the CPU with several threads, for a model `halves.suits` whose weights meet
    enough output pixels (`halves.weight_reuse` on `image_shape`), without a loss scaler
    (fp16) and not under compile (dynamo and threads). `processes`, `process_after`: the
    second halves of a model without BatchNorm or dropout go to a helper process after that
    many steps."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or compile or precision.dtype == torch.float16:
        return None
    if not suits(model) or weight_reuse(model, image_shape) < MIN_WEIGHT_REUSE:
        return None
    return BatchSplit(threads, processes=processes, process_after=process_after)


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
    split: BatchSplit | None = None  # batch halves on two threads
    settings: SpeedSettings = field(default_factory=SpeedSettings)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @contextmanager
    def epoch(
        self,
        model: nn.Module,
        autocast: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> Iterator[ForwardBackward]:
        """The loop's step function for one epoch; the thread count in use comes back after
        it (small-op hooks and the halves leave their own)."""
        steps = self.split if self.split is not None else PLAIN
        with cpu_threads(torch.get_num_threads()), steps.epoch(model, autocast, scaler) as step:
            yield step

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer`, its steps on one CPU thread where `op_threads` applies."""
        if self.settings.op_threads:
            one_thread_steps(optimizer, self.device)
        return optimizer

    def batch_threads(self) -> Callable[[int], AbstractContextManager[None]] | None:
        """For the loader: the threads to prepare a batch of so many values on."""
        if not (self.settings.op_threads and self.device.type == "cpu"):
            return None
        return lambda values: one_cpu_thread() if values < ONE_THREAD_BELOW else nullcontext()

    def describe(self) -> str:
        on = [f.name for f in fields(self.settings) if getattr(self.settings, f.name)]
        return ", ".join(on) if on else "plain"

    def close(self) -> None:
        if self.split is not None:
            self.split.close()  # its helper thread and process end with the run


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
    halves = None
    if settings.batch_halves:
        halves = batch_split(model, device, resolved, compile, settings.helper_process)
    # Not both: the hooks' thread counts are those of a whole batch on every thread.
    if halves is None and settings.op_threads and not compile:  # dynamo traces thread switches
        small_ops_on_one_thread(model, device)
    layout = torch.contiguous_format
    if settings.channels_last:
        layout = memory_format(model, device)
    return Speed(
        net=compiled(model, compile),
        precision=resolved,
        scaler=resolved.scaler(device),
        memory_format=layout,
        split=halves,
        settings=settings,
        device=device,
    )
