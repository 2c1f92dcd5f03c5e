"""Config validation: every user mistake becomes one UserError line before data loads.

`validate` runs one check per part of the config (top-level keys, then one per group); each
names the key, the value and what is allowed. Keys of the `model` group are checked by
model construction, which also happens before any data is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_run.errors import UserError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MAX_SEED = 2**32 - 1  # numpy's seed range; torch's is wider
CIFAR10_TRAIN_IMAGES = 50_000
DATA_SOURCES = ("cifar10", "imagefolder")

# Keys the code reads from each part of the config; removing one (`~seed`) is a mistake.
REQUIRED_KEYS = {
    "": (
        "model",
        "data",
        "augment",
        "optim",
        "sched",
        "batch_size",
        "lr",
        "epochs",
        "prune",
        "seed",
        "device",
        "dry_run",
        "resume",
        "deterministic",
    ),
    "data": ("name", "root", "download", "val_size", "subset", "split_seed", "cache_dir"),
}


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


def seed_value(key: str, value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise UserError(f"{key}={value}: must be an integer in [0, {MAX_SEED}]")
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


def _imagefolder_train_images(root: Path) -> int:
    """Images under root/train/<class>/: a directory listing, nothing is decoded."""
    from cifar_run.data import IMAGE_SUFFIXES

    return sum(
        1
        for d in os.scandir(root / "train")
        if d.is_dir()
        for e in os.scandir(d.path)
        if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
    )


def check_data(data: DictConfig) -> None:
    """The `data` group: source, folder, split sizes and seeds."""
    if data.name not in DATA_SOURCES:
        raise UserError(
            f"data.name={data.name}: unknown source; allowed: {', '.join(DATA_SOURCES)}"
        )
    boolean("data.download", data.download)
    if data.cache_dir is not None and not isinstance(data.cache_dir, str):
        raise UserError(f"data.cache_dir={data.cache_dir}: must be a folder path or null")
    seed_value("data.split_seed", data.split_seed)
    if data.subset is not None:
        positive_int("data.subset", data.subset)

    root = None if data.root is None else Path(str(data.root)).expanduser()
    train_images = None  # known before loading for CIFAR-10 and image folders
    if data.name == "imagefolder":
        if root is None or not root.is_dir():
            raise UserError(
                f"data.root={data.root}: no such folder; point it at a folder holding "
                "train/<class>/* and test/<class>/*"
            )
        for part in ("train", "test"):
            if not (root / part).is_dir():
                raise UserError(
                    f"data.root={data.root}: no '{part}' folder; expected "
                    f"{data.root}/train/<class>/*.jpg and {data.root}/test/<class>/*.jpg"
                )
        train_images = _imagefolder_train_images(root)
    else:
        if root is None:
            raise UserError("data.root=None: must be the folder holding cifar-10-batches-py/")
        if not data.download and not root.is_dir():
            raise UserError(f"data.root={data.root}: no such folder and data.download=false")
        train_images = CIFAR10_TRAIN_IMAGES

    val = data.val_size
    if isinstance(val, float):
        if not 0 < val < 1:
            raise UserError(
                f"data.val_size={val}: a fraction must be in (0, 1); or give a count >= 0"
            )
    elif not _is_int(val) or not 0 <= val < train_images:
        raise UserError(
            f"data.val_size={val}: must be a count in [0, {train_images}) (the training set "
            f"has {train_images} images) or a fraction in (0, 1)"
        )


def check_structure(cfg: DictConfig) -> None:
    """Every required key is there, has a value (not `???`) and resolves."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]}=???: no value given; set it, e.g. {missing[0]}=<value>")
    for group, keys in REQUIRED_KEYS.items():
        node = OmegaConf.select(cfg, group) if group else cfg
        for key in keys:
            if not isinstance(node, DictConfig) or key not in node:
                full = f"{group}.{key}" if group else key
                raise UserError(f"{full}: missing from the config; this key is required")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        message = str(exc).strip().splitlines()[0]
        raise UserError(f"{exc.full_key or 'config'}: cannot be resolved ({message})") from None


def check_top_level(cfg: DictConfig) -> None:
    """The keys of conf/config.yaml itself."""
    positive_int("batch_size", cfg.batch_size)
    positive_number("lr", cfg.lr)
    positive_int("epochs", cfg.epochs)
    seed_value("seed", cfg.seed)
    check_device(cfg.device)
    if cfg.get("threads") is not None:
        positive_int("threads", cfg.threads)
    boolean("dry_run", cfg.dry_run)
    boolean("resume", cfg.resume)
    boolean("deterministic", cfg.deterministic)
    if not _is_number(cfg.prune) or cfg.prune != 0:
        raise UserError(f"prune={cfg.prune}: pruning is not implemented yet; allowed: 0")


def validate(cfg: DictConfig) -> None:
    """Check types and ranges of every key, raising UserError: one check per part."""
    check_structure(cfg)
    check_top_level(cfg)
    check_data(cfg.data)
