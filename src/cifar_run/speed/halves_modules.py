"""What some modules do differently inside one half of a split step (cifar_run.speed.halves).

BatchNorm2d normalizes over the whole batch, not its half: each half computes its
per-channel mean and variance, the two threads swap them and both normalize with the
statistics of the whole batch; in the backward pass they swap the per-channel sums the input
gradient needs (of the output gradient, and of it times the normalized input) the same way.
The result is BatchNorm's, forward and backward, to rounding; the running statistics are
updated once, by the calling thread, from the whole batch's. Without the swap each half
would normalize with its own statistics: another model.

Dropout and Dropout2d draw their masks from a generator of their half, seeded from torch's
global generator by the calling thread before the halves start, so that a run repeats
(two threads drawing from the one global generator would interleave in any order).

`for_halves` gives a model's modules this behaviour by changing their class to a subclass
(HalvesBatchNorm2d, HalvesDropout, HalvesDropout2d): the modules keep their parameters
(which the optimizer already holds), buffers and state-dict keys, and outside a split step
(evaluation, a whole batch) they run their own class's forward.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cifar_run.speed.module_swap import swap_classes

# How long one half waits for the other at a BatchNorm before giving up: both run the same
# layers at the same time, so only a half that never arrives (an error, a model whose two
# halves take different paths) gets near it.
WAIT_SECONDS = 300.0

_CHANNEL = (1, -1, 1, 1)  # a per-channel vector broadcast over (N, C, H, W)
_local = threading.local()  # the Half this thread runs, if any


class Swap:
    """Values two threads exchange during one split step, one exchange per BatchNorm call
    and pass: each puts its value in, waits for the other, and both read the pair."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[threading.Barrier, list]] = {}
        self._lock = threading.Lock()
        self._calls = (Counter(), Counter())  # per rank: calls so far of each (layer, pass)
        self._stopped = False

    def __call__(self, rank: int, key: tuple, value: Any) -> tuple[Any, Any]:
        # Numbered per thread, so that a module called twice in one pass pairs up call by call.
        self._calls[rank][key] += 1
        key = (*key, self._calls[rank][key])
        with self._lock:
            if self._stopped:  # the other half stopped before this layer's barrier existed
                raise HalfStopped("batch halves: the other half stopped before a BatchNorm")
            barrier, slots = self._entries.setdefault(
                key, (threading.Barrier(2, timeout=WAIT_SECONDS), [None, None])
            )
        slots[rank] = value
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise HalfStopped("batch halves: the other half stopped before a BatchNorm") from None
        return slots[0], slots[1]

    def abort(self) -> None:
        """Release a thread waiting for a half that failed."""
        with self._lock:
            self._stopped = True
            for barrier, _ in self._entries.values():
                barrier.abort()


class HalfStopped(RuntimeError):
    """The other half of the step stopped (an error) before a BatchNorm layer this one
    waited at, or did not reach it within WAIT_SECONDS."""


@dataclass(frozen=True)
class Half:
    """One half of a split step, as the thread running it sees it."""

    swap: Swap  # what the two halves exchange
    rank: int  # 0: the calling thread's half, 1: the helper's
    generator: torch.Generator | None  # this half's random draws (None: the model draws none)


def set_half(half: Half | None) -> None:
    """Mark the calling thread as running `half` of a split step (None: no longer)."""
    _local.half = half


def _current() -> Half | None:
    return getattr(_local, "half", None)


class _WholeBatchNorm(torch.autograd.Function):
    """BatchNorm of one half with the whole batch's statistics, and its exact gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        bn: nn.BatchNorm2d,
        swap: Swap,
        rank: int,
    ) -> torch.Tensor:
        # torch's own per-channel statistics kernel (the one its BatchNorm uses; var_mean
        # is far slower on channels_last batches). For bf16 or fp16 input (autocast) it
        # returns them in that dtype unless given fp32 running buffers (left as they are, at
        # momentum 0), which make it take them in fp32, as BatchNorm itself does there.
        buffers = (None, None)
        if x.dtype in (torch.bfloat16, torch.float16):
            buffers = tuple(torch.zeros(x.shape[1], device=x.device) for _ in range(2))
        mean, var = torch.batch_norm_update_stats(x, *buffers, 0.0)
        count = x.numel() // x.shape[1]
        (n0, m0, v0), (n1, m1, v1) = swap(rank, (id(bn), "forward"), (count, mean, var))
        n = n0 + n1
        delta = m1 - m0  # Chan et al.'s pairwise merge of two halves' mean and variance
        mean = m0 + delta * (n1 / n)
        var = (v0 * n0 + v1 * n1 + delta * delta * (n0 * n1 / n)) / n
        if rank == 0 and bn.running_mean is not None:
            _update_running_stats(bn, mean, var, n)
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, bn.eps, False)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + bn.eps))
        ctx.bn, ctx.swap, ctx.rank, ctx.n = bn, swap, rank, n
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        ones = torch.ones_like(mean)
        scale = invstd if weight is None else weight * invstd
        # The input gradient over the whole batch, xhat the normalized input:
        #   dx = scale * (grad - sum(grad) / n - xhat * sum(grad * xhat) / n)
        # The sums: this half's (its weight and bias gradients), swapped with the other's.
        # In bf16 or fp16 (autocast) the three terms of dx nearly cancel, so torch's kernel
        # takes them over this half too, in fp32, rounded once (its sums the half's).
        reduced = grad.dtype != scale.dtype
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.bn.eps, [reduced, True, True]
        )
        (dw0, db0), (dw1, db1) = ctx.swap(ctx.rank, (id(ctx.bn), "backward"), (dw, db))
        if reduced:
            # Add what the whole batch's sums change, a smaller term (m: the half's count):
            #   scale * (db_h / m - db / n) + scale * xhat * (dw_h / m - dw / n)
            m = x.numel() // x.shape[1]
            slope = scale * invstd * (dw / m - (dw0 + dw1) / ctx.n)
            offset = scale * (db / m - (db0 + db1) / ctx.n)
            dx += torch.batch_norm(x, slope, offset, mean, ones, False, 0.0, 0.0, False)
        else:
            # dx = slope * (x - mean) + offset + scale * grad; the per-channel affine map by
            # torch's inference BatchNorm kernel (unit variance, no eps), the fastest here.
            slope = -scale * invstd * (dw0 + dw1) / ctx.n
            offset = -scale * (db0 + db1) / ctx.n
            dx = torch.batch_norm(x, slope, offset, mean, ones, False, 0.0, 0.0, False)
            dx.addcmul_(scale.view(_CHANNEL), grad)
        if weight is None:
            return dx, None, None, None, None, None
        return dx, dw, db, None, None, None


@torch.no_grad()
def _update_running_stats(
    bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int
) -> None:
    """As BatchNorm2d's training forward does: momentum, or a cumulative average when
    momentum is None; the running variance unbiased."""
    factor = bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if factor is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean, factor)
    bn.running_var.lerp_(var * (n / max(n - 1, 1)), factor)


class HalvesBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in a split step's half, normalizes with the whole batch's
    statistics; anywhere else, BatchNorm2d itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = _current()
        if half is None or not self.training:
            return super().forward(x)
        return _WholeBatchNorm.apply(x, self.weight, self.bias, self, half.swap, half.rank)


def _drop(
    x: torch.Tensor, p: float, mask_shape: tuple[int, ...], inplace: bool, half: Half
) -> torch.Tensor:
    """x with a random share p of its elements (or channels: `mask_shape`) zeroed and the
    rest scaled by 1 / (1 - p), as F.dropout does, drawn from the half's generator."""
    keep = torch.empty(mask_shape, dtype=x.dtype, device=x.device)
    keep.bernoulli_(1.0 - p, generator=half.generator).div_(1.0 - p)
    return x.mul_(keep) if inplace else x * keep


class HalvesDropout(nn.Dropout):
    """Dropout that, in a split step's half, draws from the half's generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = _current()
        if half is None or not self.training or self.p == 0:
            return super().forward(x)
        return _drop(x, self.p, tuple(x.shape), self.inplace, half)


class HalvesDropout2d(nn.Dropout2d):
    """Dropout2d (whole channels) that, in a split step's half, draws from the half's
    generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = _current()
        if half is None or not self.training or self.p == 0:
            return super().forward(x)
        # One draw per (image, channel), as F.dropout2d makes for batched input.
        return _drop(x, self.p, (*x.shape[:2], *(1,) * (x.dim() - 2)), self.inplace, half)


# The modules a split step changes, and what they become.
FOR_HALVES: dict[type, type] = {
    nn.BatchNorm2d: HalvesBatchNorm2d,
    nn.Dropout: HalvesDropout,
    nn.Dropout2d: HalvesDropout2d,
}


# The modules among them that draw random numbers.
RANDOM = (HalvesDropout, HalvesDropout2d)


def for_halves(model: nn.Module) -> None:
    """Give `model`'s BatchNorm2d, Dropout and Dropout2d modules their split-step behaviour
    (FOR_HALVES), in place."""
    swap_classes(model, FOR_HALVES)
