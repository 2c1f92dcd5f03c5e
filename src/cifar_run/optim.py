"""Optimizers and schedulers from their config groups (`_target_` + `_partial_`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import hydra.utils
import torch

# Keys of an optim/sched entry that describe how we use it rather than constructor arguments.
_OPTIM_META = ("name", "label_smoothing")
_SCHED_META = ("name", "interval")


def build_optimizer(
    cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer named by the `optim` group, with the top-level learning rate."""
    spec = {k: v for k, v in cfg.items() if k not in _OPTIM_META}
    return hydra.utils.instantiate(spec, _convert_="all")(params, lr=lr)


def build_scheduler(
    cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer
) -> tuple[Any | None, str]:
    """(scheduler or None, interval), interval being `epoch` or `step`."""
    if cfg.get("name") == "none":
        return None, "epoch"
    spec = {k: v for k, v in cfg.items() if k not in _SCHED_META}
    return hydra.utils.instantiate(spec, _convert_="all")(optimizer), cfg.get("interval", "epoch")
