"""Config validation: every user mistake becomes one UserError line before data loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cifar_run.errors import UserError
from cifar_run.pruning_config import PruningSettings, validate_pruning

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(key: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise UserError(f"{key}={value}: must be a positive integer")
    return value


def non_negative_int(key: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise UserError(f"{key}={value}: must be an integer >= 0")
    return value


def positive_number(key: str, value: Any) -> float:
    if not _is_number(value) or not value > 0 or value != value or value == float("inf"):
        raise UserError(f"{key}={value}: must be a positive number")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value}: must be true or false")
    return value


def check_device(value: Any) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and the CUDA device must exist."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise UserError(f"device={value}: must be auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"device={value}: CUDA is not available on this machine; use device=cpu or auto"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device={value}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def check_data(data: DictConfig) -> None:
    val = data.val_size
    if isinstance(val, float) and not isinstance(val, bool):
        if not 0 < val < 1:
            raise UserError(
                f"data.val_size={val}: a fraction must be in (0, 1); or give a count >= 0"
            )
    else:
        non_negative_int("data.val_size", val)
    non_negative_int("data.split_seed", data.split_seed)
    if data.subset is not None:
        positive_int("data.subset", data.subset)
    if data.name == "imagefolder":
        root = data.root
        if root is None or not Path(str(root)).expanduser().is_dir():
            raise UserError(
                f"data.root={root}: no such folder; point it at a folder holding "
                "train/<class>/* and test/<class>/*"
            )
    elif data.name == "cifar10":
        if not data.download and not Path(str(data.root)).expanduser().is_dir():
            raise UserError(f"data.root={data.root}: no such folder and data.download=false")


def validate(cfg: DictConfig) -> None:
    """Check types and ranges of every key this module knows, raising UserError."""
    positive_int("batch_size", cfg.batch_size)
    positive_number("lr", cfg.lr)
    positive_int("epochs", cfg.epochs)
    non_negative_int("seed", cfg.seed)
    boolean("dry_run", cfg.dry_run)
    check_device(cfg.device)
    check_pruning(cfg)
    check_data(cfg.data)


def check_pruning(cfg: DictConfig) -> PruningSettings:
    """`prune` and the `pruning` group; with a pruning stage, the layer selection too.

    The selection is checked on a model built on the meta device (no memory, no init work),
    so an empty one fails here, before any data loads.
    """
    settings = validate_pruning(cfg.prune, cfg.get("pruning"))
    if settings.enabled or settings.curve:
        import torch

        from cifar_run.models import build_model
        from cifar_run.pruning import prunable_parameters

        try:
            with torch.device("meta"):
                model = build_model(cfg.model)
        except Exception:  # a broken model config is reported where the run builds it
            return settings
        prunable_parameters(model, settings.include_classifier)
    return settings
