"""Model construction: each `conf/model/NAME.yaml` names a class with `_target_`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import hydra.utils
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run.errors import UserError

# Model keys whose null means "from the data" (config.data_keys fills them in before a run
# builds its model); a null still here is left out, so the class's own default applies.
DATA_KEYS = ("num_classes", "input_size")


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
    for key in DATA_KEYS:
        if key in spec and spec[key] is None:
            del spec[key]
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


def check_input(
    model: nn.Module, image_size: int, num_classes: int, name: str, size_key: str
) -> None:
    """One blank `image_size` x `image_size` image through `model` (eval mode, no gradients,
    the mode restored): a model that cannot take that size, or that gives another number of
    outputs than the data has classes, is a one-line UserError before any training, naming
    `size_key` (the setting the size comes from, e.g. `data.image_size=64`)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    except (RuntimeError, ValueError) as exc:  # the shape errors of torch's layers
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(
            f"{size_key}: model {name} cannot take {image_size}x{image_size} images ({reason}); "
            "choose another model or image size"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        shape = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model={name}: gives outputs of shape {shape} per image, but the data has "
            f"{num_classes} classes; give the model's config a num_classes key (null = the "
            "data's count) that its class takes"
        )
