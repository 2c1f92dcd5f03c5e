"""An exponential moving average of a model's weights, the `ema` key.

torch.optim.swa_utils.AveragedModel keeps the copy; parameters and buffers (BatchNorm's
running statistics) are averaged alike, after every optimizer step:
`average = decay * average + (1 - decay) * weights`, starting from the weights the average
was made from (as timm's ModelEmaV2; torch's own first update would copy the weights after
the first step instead).
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """A moving average of `model`, starting from its current weights on its device.

    The step counter `n_averaged` stays on the CPU (AveragedModel's default) even for a CUDA
    model: the update reads it every step, and a CUDA counter would make that read a host
    synchronisation."""
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    average.update_parameters(model)  # counts the starting weights as the first average
    return average


def averaged_weights(state: dict) -> dict:
    """The model's own state dict out of an AveragedModel's (its `module.` entries)."""
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
