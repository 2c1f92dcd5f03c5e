"""Small linear layers in fp32 under CPU autocast.

Under bf16 autocast on the CPU every linear layer casts its input and weight to bf16 and
runs its three matrix multiplies (forward, input and weight gradient) through oneDNN, which
costs some 30 us per multiply before any arithmetic, and its backward casts the gradients
back. For the classifier heads of CIFAR nets (LeNet-5's 400 -> 120 -> 84 -> 10, ResNet's
512 -> 10) that fixed cost is most of the layer: forward and backward of LeNet-5's first
linear layer at batch 32 took 488 us in bf16 and 277 in fp32, and ResNet-18's head at batch
128 548 against 258 (one thread; docs/benchmarks.md, "Small linear layers in fp32"). So a
linear layer's call runs in fp32 there when it is small, at most `MAX_FP32_MACS`
multiply-adds (rows of the input x in_features x out_features): its input is cast up (a
no-op after another such layer) and its output stays fp32, which the loss computes in
anyway. Larger calls keep autocast's bf16, where the matrix units pay. fp32 time over bf16
time on one thread (each half of a batch in halves runs on one): 0.45-0.57 up to 1.5 M
multiply-adds, 0.77 at 4 M (32 rows, 512 -> 256), 0.84-1.01 at 8 M, 1.11-1.20 at 17 M,
1.31-1.56 from 34 M up. On two threads fp32 stayed faster up to 128 x 2048 x 2048.

`Fp32Linear` is an `nn.Linear` with the same parameters and state dict (the swap changes
the class only, as conv_grad does), so pruning's hooks and checkpoints see a plain Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_run.module_swap import swap_classes

MAX_FP32_MACS = 1 << 23  # multiply-adds of one call: rows * in_features * out_features


class Fp32Linear(nn.Linear):
    """nn.Linear that leaves CPU autocast for fp32 (module doc)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        small = input.numel() * self.out_features <= MAX_FP32_MACS  # rows * in * out
        if input.device.type == "cpu" and small and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return F.linear(input.float(), self.weight, self.bias)
        return super().forward(input)


def use_fp32_linears(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into an Fp32Linear, in place. Returns how many
    were changed."""
    return swap_classes(model, {nn.Linear: Fp32Linear})
