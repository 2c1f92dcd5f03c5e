"""Model construction: each `conf/model/NAME.yaml` names a class with `_target_`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from torch import nn


def build_model(model_cfg: DictConfig | Mapping[str, Any]) -> nn.Module:
    """Instantiate the model described by a `model` config group entry.

    The `name` key is for reports only; every other key goes to the `_target_` class.
    """
    if isinstance(model_cfg, DictConfig):
        spec = OmegaConf.to_container(model_cfg, resolve=True)
    else:
        spec = dict(model_cfg)
    spec.pop("name", None)
    return hydra.utils.instantiate(spec, _convert_="all")


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not, as the papers count them."""
    return sum(p.numel() for p in model.parameters())
