"""Speed settings: mixed precision, memory format, convolution weight gradients, small linear
layers in fp32, batch halves and torch.compile (CPU thread counts: cifar_run.cores; the C
heap: cifar_run.heap).

Plain values in, torch objects out; run.py and scripts/bench.py read the config and call
these, so the CLI and the benchmark train the same way. The rules, and the measurements
behind them, are in docs/benchmarks.md ("Speed settings").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cifar_run.constants import PRECISIONS
from cifar_run.conv_grad import use_tap_weight_grads
from cifar_run.cores import small_ops_on_one_thread
from cifar_run.errors import UserError
from cifar_run.fp32_linear import use_fp32_linears
from cifar_run.fp32_pool import use_fp32_pools
from cifar_run.heap import keep_freed_memory
from cifar_run.split import PROCESS_AFTER, BatchSplit, suits


def batch_split(
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    compile: bool = False,
    processes: bool = True,
    process_after: int = PROCESS_AFTER,
) -> BatchSplit | None:
    """Halves of each training batch on two threads (cifar_run.split) where they suit: on
    the CPU with several threads, for a model `split.suits` (no norm layer but BatchNorm2d,
    no dropout but Dropout and Dropout2d), without a loss scaler (fp16) and not under
    compile (dynamo and threads).

    On the 2-vCPU guest a LeNet-5 step at batch 64 took 4.2 ms that way against 4.9 with
    the whole batch and small ops on one thread, and 1.2-1.4x less at batch sizes from 8 to
    512 (docs/benchmarks.md, "Batch halves on two threads"). None where it does not
    apply. `processes`, `process_after`: the second halves of a model without BatchNorm or
    dropout go to a helper process after that many steps (BatchSplit)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or compile or precision.dtype == torch.float16:
        return None
    if not suits(model):
        return None
    return BatchSplit(threads, processes=processes, process_after=process_after)


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


def fp32_narrow_pools(model: nn.Module, device: torch.device, precision: Precision) -> int:
    """Under CPU bf16 autocast, let the model's max pools over fewer than 8 channels compute
    in fp32, to the same bits (cifar_run.fp32_pool: LeNet-5's first pool, 0.22 ms of a
    3.2 ms one-thread half step). Returns how many pools may take that route: none on CUDA
    or without bf16 autocast."""
    if device.type != "cpu" or precision.dtype != torch.bfloat16:
        return 0
    return use_fp32_pools(model)


def fp32_small_linears(model: nn.Module, device: torch.device, precision: Precision) -> int:
    """Under CPU autocast, let the model's linear layers compute small calls in fp32, where
    they were about twice as fast as in bf16 (cifar_run.fp32_linear: a one-thread LeNet-5
    half-batch step 1.12x faster, a whole step in halves 1.02-1.03x). Parameters and state
    dict are unchanged. Returns how many layers may take that route: none on CUDA or
    without autocast."""
    if device.type != "cpu" or precision.dtype is None:
        return 0
    return use_fp32_linears(model)


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
    fp32_linears: bool = True,
    process_halves: bool = True,
    fp32_pools: bool = True,
) -> Speed:
    """Resolve `precision`, swap in conv_grad's convolutions (CPU, not under compile),
    fp32_linear's small linear layers (CPU autocast; `fp32_linears`) and fp32_pool's max
    pools (CPU bf16 autocast; `fp32_pools`), split
    batches in halves on two threads where that suits the model (`split`) or else run small
    ops on one thread (CPU, not under compile; `op_threads`), the second halves in a helper
    process where the model allows (`process_halves`), compile if asked and pick the
    batches' memory format: one call, so run.py and scripts/bench.py train the same way.
    On the CPU the C heap keeps freed memory for the next step (cifar_run.heap; for the
    whole process). Keep `model` for state dicts and pruning."""
    resolved = resolve_precision(precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    tap_conv_grads(model, device, compile=compile)
    if fp32_linears:
        fp32_small_linears(model, device, resolved)
    if fp32_pools:
        fp32_narrow_pools(model, device, resolved)
    halves = batch_split(model, device, resolved, compile, process_halves) if split else None
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
