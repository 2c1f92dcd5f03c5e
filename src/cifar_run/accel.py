"""Speed settings: CPU threads, mixed precision, memory format, convolution weight gradients
and torch.compile.

Plain values in, torch objects out; run.py and scripts/bench.py read the config and call
these, so the CLI and the benchmark train the same way. The rules, and the measurements
behind them, are in docs/benchmarks.md ("Speed settings").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cifar_run.constants import PRECISIONS
from cifar_run.conv_grad import use_tap_weight_grads
from cifar_run.errors import UserError
from cifar_run.split import BatchSplit, suits


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
    """CPU ops inside run on `count` threads; the count in use before comes back on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_cpu_thread() -> AbstractContextManager[None]:
    """CPU ops inside run on one thread (`cpu_threads(1)`)."""
    return cpu_threads(1)


def one_thread_steps(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Run `optimizer`'s steps on one CPU thread (hooks around each step; the other ops keep
    every thread). Returns whether the hooks were added (on the CPU, with several threads).

    An optimizer step is one short parallel region per parameter tensor, and under the
    passive OpenMP waits cifar-run sets each region wakes the sleeping threads first: about
    65 us on this project's 2-vCPU guest, more than a 300,000-element add takes on one
    thread. torch's fused SGD step took 0.52 ms on two threads and 0.04 on one for LeNet-5,
    6.8 and 5.1 ms for ResNet-18 (docs/benchmarks.md, "Optimizer steps on one thread").
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return False
    optimizer.register_step_pre_hook(lambda *_: torch.set_num_threads(1))
    # Back to the count of the time the hooks were added (a step that raises leaves one
    # thread, but it ends the run).
    optimizer.register_step_post_hook(lambda *_: torch.set_num_threads(threads))
    return True


# Elements under which an elementwise op (or a small matrix multiply) runs faster on one thread
# than on two under passive waits: waking the second thread costs about 65 us on this
# project's 2-vCPU guest, where a lerp of 320,000 floats took 68 us on one thread and 89 on
# two, one of 640,000 168 and 140 (docs/benchmarks.md, "Small tensors of the average on one
# thread").
ONE_THREAD_BELOW = 1 << 19

# Modules worth every thread however small their tensors: many multiply-adds per element
# (LeNet-5's convolutions and pools at batch 64 ran 1.3-1.6x faster on two threads than on one).
PARALLEL_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def small_ops_on_one_thread(model: nn.Module, device: torch.device) -> bool:
    """Run `model`'s ops on tensors of fewer than ONE_THREAD_BELOW elements on one CPU
    thread, forward and backward, and its convolutions and pools (PARALLEL_MODULES) on
    every thread. Returns whether hooks were added (on the CPU, with several threads, in a
    model with such modules).

    Hooks sit only where the count can change, on the convolutions and pools (a hook on
    every module cost LeNet-5 3.6% of its step): before one, every thread; after it, the
    count its output's size asks for, kept by the ops that follow it up to the next one. In
    the backward pass, where its input or output is small, hooks on its autograd node do the
    same: every thread for its own gradient, then the count of its input's size for the
    gradients of the ops before it; elsewhere it keeps every thread (in CIFAR nets tensors
    shrink only at convolutions and pools).

    In LeNet-5 at batch 64 everything but the convolutions and pools goes to one thread (a
    step 1.1x faster: docs/benchmarks.md, "Small ops on one thread"); in ResNet-18 and
    ResNet-20 at batch 128 only what follows the last pool. The count is the one of the time
    the hooks are added; the last op run leaves its own count set, so callers that go on to
    other work restore theirs.
    """
    threads = torch.get_num_threads()
    parallel = [m for m in model.modules() if isinstance(m, PARALLEL_MODULES)]
    if device.type != "cpu" or threads == 1 or not parallel:
        return False

    def to_one(*_: object) -> None:
        torch.set_num_threads(1)

    def to_all(*_: object) -> None:
        torch.set_num_threads(threads)

    def for_size(x: object) -> Callable[..., None]:
        small = isinstance(x, torch.Tensor) and x.numel() < ONE_THREAD_BELOW
        return to_one if small else to_all

    def first(module: nn.Module, args: tuple) -> None:  # the ops before the first conv
        for_size(args[0] if args else None)()

    def after(module: nn.Module, args: tuple, out: object) -> None:
        following, preceding = for_size(out), for_size(args[0] if args else None)
        following()
        # Node hooks only where the count changes: each costs tens of microseconds, and on
        # every convolution they made ResNet-20 (nothing small but the classifier) 2% slower.
        changes = to_one in (following, preceding)
        if changes and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            out.grad_fn.register_prehook(to_all)
            out.grad_fn.register_hook(preceding)

    model.register_forward_pre_hook(first)
    for module in parallel:
        module.register_forward_pre_hook(to_all)
        module.register_forward_hook(after)
    return True


def batch_split(
    model: nn.Module, device: torch.device, precision: Precision, compile: bool = False
) -> BatchSplit | None:
    """Halves of each training batch on two threads (cifar_run.split) where they suit: on
    the CPU with several threads, for a model `split.suits` (not pruned, no norm layer but
    BatchNorm2d and that only in fp32, no dropout but Dropout and Dropout2d), without a loss
    scaler (fp16) and not under compile (dynamo and threads).

    On the 2-vCPU guest a LeNet-5 step at batch 64 took 4.2 ms that way against 4.9 with
    the whole batch and small ops on one thread, and 1.2-1.4x less at batch sizes from 8 to
    512 (docs/benchmarks.md, "Batch halves on two threads"). None where it does not
    apply."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or compile or precision.dtype == torch.float16:
        return None
    return BatchSplit(threads) if suits(model, precision.dtype) else None


# ---------------------------------------------------------------------------------------------
# Precision


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


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_amx() -> bool:
    """AMX: the CPU's matrix units, where bf16 multiplies run several times faster than fp32
    (3.4x in a 2048 x 2048 matrix multiply on a 2-vCPU Sapphire Rapids guest).

    AVX-512 BF16 alone is not enough: on a Sapphire Rapids guest without AMX, oneDNN's
    AVX-512 BF16 kernels multiplied at half the fp32 rate (210 vs 399 GFLOP/s) and training
    steps ran 1.4x slower in bf16 than in fp32 (LeNet-5 and ResNet-18; docs/benchmarks.md,
    "bf16 without AMX")."""
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


# ---------------------------------------------------------------------------------------------
# Memory format and compilation


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) batches for conv nets on the CPU and CUDA, else the default NCHW.

    cuDNN's tensor-core kernels work in NHWC. On the CPU, oneDNN's NHWC kernels were faster
    for every conv net measured, LeNet-5's 3- and 6-channel convolutions included (a step
    16% faster in bf16, 22% in fp32: docs/benchmarks.md, "Speed settings"). Only the batches
    change layout: the model's weights stay NCHW, so state dicts, checkpoints and pruning see
    plain tensors (torch's global pruning flattens weights with `view(-1)`, which NHWC
    weights refuse).
    """
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if not has_conv or device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    return torch.channels_last


def tap_conv_grads(model: nn.Module, device: torch.device, compile: bool = False) -> int:
    """On the CPU, let the model's convolutions run as matrix multiplies on small feature
    maps where that is faster (cifar_run.conv_grad: a ResNet-18 step 1.4-1.5x faster in
    bf16). Parameters and state dict are unchanged. Returns how many convolutions may take
    that route.

    Not under `compile`: dynamo traces the custom autograd Functions, which made compiling
    ResNet-9 take 210 s instead of 30 s (docs/benchmarks.md).
    """
    if device.type != "cpu" or compile:
        return 0
    return use_tap_weight_grads(model)


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile(model)` when enabled, else the model itself.

    The compiled wrapper shares the model's parameters; keep using the original module for
    state dicts, checkpoints and pruning (the wrapper's keys carry an `_orig_mod.` prefix,
    and pruning's reparametrisation needs a fresh compile anyway).
    """
    return torch.compile(model) if enabled else model


@dataclass(frozen=True)
class Speed:
    """Everything a training loop needs from the speed settings, resolved for one model."""

    net: nn.Module  # the module to call: compiled, or the model itself
    precision: Precision
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format  # of the batches (the weights stay NCHW)
    split: BatchSplit | None = None  # for train_one_epoch: batch halves on two threads


def speed_setup(
    model: nn.Module,
    device: torch.device,
    precision: str,
    compile: bool = False,
    op_threads: bool = True,
    split: bool = True,
) -> Speed:
    """Resolve `precision`, swap in conv_grad's convolutions (CPU, not under compile), split
    batches in halves on two threads where that suits the model (`split`) or else run small
    ops on one thread (CPU, not under compile; `op_threads`), compile if asked and pick the
    batches' memory format: one call, so run.py and scripts/bench.py train the same way.
    Keep `model` for state dicts and pruning."""
    resolved = resolve_precision(precision, device)
    tap_conv_grads(model, device, compile=compile)
    halves = batch_split(model, device, resolved, compile) if split else None
    # Not both: the hooks' thread counts are those of a whole batch on every thread.
    if halves is None and op_threads and not compile:  # dynamo would trace the thread switches
        small_ops_on_one_thread(model, device)
    return Speed(
        net=compiled(model, compile),
        precision=resolved,
        scaler=resolved.scaler(device),
        memory_format=memory_format(model, device),
        split=halves,
    )
