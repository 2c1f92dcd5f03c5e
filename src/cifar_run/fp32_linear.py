"""Small linear layers in fp32 under CPU autocast.

Under bf16 autocast on the CPU every linear layer casts its input and weight to bf16 and
runs its three matrix multiplies (forward, input and weight gradient) through oneDNN, which
costs some 30 us per multiply before any arithmetic, and its backward casts the gradients
back. For the classifier heads of CIFAR nets (LeNet-5's 400 -> 120 -> 84 -> 10, ResNet's
512 -> 10) that fixed cost is most of the layer: forward and backward of LeNet-5's first
linear layer at batch 32 took 488 us in bf16 and 277 in fp32, and ResNet-18's head at batch
128 548 against 258 (one thread; docs/benchmarks.md, "Small linear layers in fp32"). So
linear layers of at most `MAX_FP32_WEIGHTS` weights run in fp32 there: their input is cast
up (a no-op after another such layer) and their output stays fp32, which the loss computes
in anyway. Larger layers keep autocast's bf16, where its matrix units pay (1.3-1.5x at
1024 x 1024 and more, one thread).

`Fp32Linear` is an `nn.Linear` with the same parameters and state dict (the swap changes
the class only, as conv_grad does), so pruning's hooks and checkpoints see a plain Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_FP32_WEIGHTS = 1 << 20  # in_features * out_features; 1024 x 1024 was even at 2 threads


class Fp32Linear(nn.Linear):
    """nn.Linear that leaves CPU autocast for fp32 (module doc)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(input)
        with torch.autocast("cpu", enabled=False):
            return F.linear(input.float(), self.weight, self.bias)


def use_fp32_linears(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` with at most MAX_FP32_WEIGHTS weights into an
    Fp32Linear, in place. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        if module.in_features * module.out_features <= MAX_FP32_WEIGHTS:
            module.__class__ = Fp32Linear
            changed += 1
    return changed
