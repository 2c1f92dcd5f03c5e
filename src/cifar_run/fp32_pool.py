"""Max pools over few channels in fp32 under CPU autocast.

A conv net's output under bf16 autocast reaches its max pools in bf16, and aten's
channels_last bf16 pooling kernel is slow when the channels fill only part of a vector: on
the project's 2-vCPU AMX guest (one thread, 32 images, 28x28 maps, forward and backward)
6 channels took 879 us in bf16 and 695 in fp32 including both casts, 4 channels 612 and
375, 3 channels 500 and 517; from 8 channels up bf16 was faster (8: 382 against 464, 16:
523 against 1,003), and so on in between without a pattern below 16 (docs/benchmarks.md,
"Max pools over few channels in fp32"). So a pool over fewer than `FP32_BELOW` channels
casts its bf16 input to fp32: LeNet-5's first pool (6 channels), 0.22 ms of a 3.2 ms
one-thread half step.

The result is the bf16 pool's to the bit: the cast is exact, the maximum picks the same
element, the fp32 output is cast back to bf16 exactly by the autocast op that takes it (a
convolution or linear layer), and the gradient, which reaches the pool from such an op as
bf16 values, is routed to one element per window and cast back to bf16 exactly. Only for
windows that do not overlap (stride >= kernel, no dilation), where no gradients add up.

`Fp32MaxPool2d` is an `nn.MaxPool2d` with the same settings (the swap changes the class
only, as conv_grad does).
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_run.module_swap import swap_classes

FP32_BELOW = 8  # channels


class Fp32MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools bf16 input over few channels in fp32 (module doc)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        narrow = input.dim() == 4 and input.shape[1] < FP32_BELOW
        if narrow and input.dtype == torch.bfloat16 and input.device.type == "cpu":
            return super().forward(input.float())
        return super().forward(input)


def _disjoint(pool: nn.MaxPool2d) -> bool:
    """Whether `pool`'s windows never overlap: each input element has at most one
    gradient."""
    kernel, stride, dilation = (
        (v, v) if isinstance(v, int) else tuple(v)
        for v in (pool.kernel_size, pool.stride, pool.dilation)
    )
    return dilation == (1, 1) and all(s >= k for s, k in zip(stride, kernel, strict=True))


def use_fp32_pools(model: nn.Module) -> int:
    """Turn every plain nn.MaxPool2d of `model` whose windows do not overlap (and that
    returns no indices) into an Fp32MaxPool2d, in place. Returns how many were changed."""
    return swap_classes(
        model,
        {nn.MaxPool2d: Fp32MaxPool2d},
        where=lambda pool: _disjoint(pool) and not pool.return_indices,
    )
