"""The `data` group's checks: the source, its folder (an image folder's layout from directory
listings only), the image size and the split sizes, before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cifar_run.config.values import boolean, is_int, positive_int, seed_value
from cifar_run.constants import CIFAR_TRAIN_IMAGES
from cifar_run.data.folders import list_imagefolder
from cifar_run.errors import UserError

DATA_SOURCES = ("cifar10", "cifar100", "imagefolder")


def check_data(data: DictConfig) -> None:
    """The `data` group: source, folder, image size, split sizes and seeds."""
    if data.name not in DATA_SOURCES:
        raise UserError(
            f"data.name={data.name}: unknown source; allowed: {', '.join(DATA_SOURCES)}"
        )
    boolean("data.download", data.download)
    if "strict" in data:  # image folders only: what an unreadable file does
        boolean("data.strict", data.strict)
    if data.cache_dir is not None and not isinstance(data.cache_dir, str):
        raise UserError(f"data.cache_dir={data.cache_dir}: must be a folder path or null")
    seed_value("data.split_seed", data.split_seed)
    if data.subset is not None:
        positive_int("data.subset", data.subset)
    if "image_size" in data:
        positive_int("data.image_size", data.image_size)

    root = None if data.root is None else Path(str(data.root)).expanduser()
    if data.name == "imagefolder":
        # Directory listings only, nothing decoded: the layout, and empty class folders.
        train_images = len(list_imagefolder(str(data.root)).train)
    else:
        if root is None:
            folder = "cifar-10-batches-py/" if data.name == "cifar10" else "cifar-100-python/"
            raise UserError(f"data.root=None: must be the folder holding {folder}")
        if not data.download and not root.is_dir():
            raise UserError(f"data.root={data.root}: no such folder and data.download=false")
        train_images = CIFAR_TRAIN_IMAGES

    val = data.val_size
    if isinstance(val, float):
        if not 0 < val < 1:
            raise UserError(
                f"data.val_size={val}: a fraction must be in (0, 1); or give a count >= 0"
            )
    elif not is_int(val) or not 0 <= val < train_images:
        raise UserError(
            f"data.val_size={val}: must be a count in [0, {train_images}) (the training set "
            f"has {train_images} images) or a fraction in (0, 1)"
        )
