"""Model construction: each `conf/model/NAME.yaml` names a class with `_target_`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run.errors import UserError


def build_model(model_cfg: DictConfig | Mapping[str, Any]) -> nn.Module:
    """Instantiate the model described by a `model` config group entry.

    The `name` key is for reports only; every other key goes to the `_target_` class.
    A :class:`UserError` raised while building (an impossible layer) reaches the caller as
    itself, not wrapped in Hydra's ``InstantiationException``; so does a key the model does
    not take (e.g. a typo in ``model.widht=...``).
    """
    if isinstance(model_cfg, DictConfig):
        spec = OmegaConf.to_container(model_cfg, resolve=True)
    else:
        spec = dict(model_cfg)
    name = spec.pop("name", None)
    if "_target_" not in spec:
        raise UserError(f"model {name!r}: no _target_ key naming the class to build")
    try:
        return hydra.utils.instantiate(spec, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            bad = str(cause).rsplit("argument", 1)[-1].strip(" '\"")
            target = hydra.utils.get_method(spec["_target_"])
            allowed = [k for k in inspect.signature(target).parameters if k != "self"]
            raise UserError(
                f"model.{bad}: not a key of model {name!r}; allowed: {', '.join(allowed)}"
            ) from None
        raise


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not, as the papers count them."""
    return sum(p.numel() for p in model.parameters())
