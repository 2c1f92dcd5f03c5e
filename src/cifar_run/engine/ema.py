"""An exponential moving average of a model's weights, the `ema` key.

torch.optim.swa_utils.AveragedModel keeps the copy; parameters and buffers (BatchNorm's
running statistics) are averaged alike, after every optimizer step:
`average = decay * average + (1 - decay) * weights`, starting from the weights the average
was made from (as timm's ModelEmaV2; torch's own first update would copy the weights after
the first step instead).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage(AveragedModel):
    """An AveragedModel that keeps its decay, so that `step_function` needs only the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay  # a plain attribute: the state dict stays AveragedModel's


def weight_average(model: nn.Module, decay: float) -> WeightAverage:
    """A moving average of `model`, starting from its current weights on its device.

    The step counter `n_averaged` stays on the CPU (AveragedModel's default) even for a CUDA
    model: the update reads it every step, and a CUDA counter would make that read a host
    synchronisation."""
    average = WeightAverage(model, decay)
    average.update_parameters(model)  # counts the starting weights as the first average
    return average


def step_function(average: WeightAverage, model: nn.Module) -> Callable[[], None]:
    """`average.update_parameters(model)` for an average `weight_average(model, decay)` made,
    with the tensors paired once instead of on every step.

    The arithmetic is get_ema_multi_avg_fn's (one foreach lerp over the floating-point
    tensors, `decay * average + (1 - decay) * weights` for integer buffers such as
    BatchNorm's batch counter), so the results are identical; what goes is AveragedModel's
    per-step pairing and grouping of every tensor in Python, a noticeable share of a small
    net's CPU step (docs/speed.md; scripts/bench_ema.py). The pairs hold the tensors
    themselves, which optimizers and load_state_dict update in place; build it again after
    replacing one.
    """
    pairs = [
        (a.detach(), m.detach())
        for a, m in zip(
            itertools.chain(average.module.parameters(), average.module.buffers()),
            itertools.chain(model.parameters(), model.buffers()),
            strict=True,
        )
    ]
    floats = [(a, m) for a, m in pairs if a.is_floating_point()]
    averages, weights = [a for a, _ in floats], [m for _, m in floats]
    others = [(a, m) for a, m in pairs if not a.is_floating_point()]
    decay = average.decay

    @torch.no_grad()
    def step() -> None:
        if averages:
            torch._foreach_lerp_(averages, weights, 1 - decay)
        for a, m in others:
            a.copy_(a * decay + m * (1 - decay))
        average.n_averaged += 1

    return step


def averaged_weights(state: dict) -> dict:
    """The model's own state dict out of an AveragedModel's (its `module.` entries)."""
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
