"""Model keys that follow the data, known before anything is loaded.

A model config sets `num_classes: null` (and the cnn family `input_size: null`) to take them
from the data: the class count (an image folder's class folders under train/; CIFAR-10: 10;
CIFAR-100: 100) and the image side (`data.image_size`; CIFAR: 32). `follow_data` fills them
in before a run builds its model, so the run folder's config.yaml holds the numbers the model
was built with (what resume and `cifar-run predict` read back). A value set explicitly must
agree with the data: `check_model_keys` says so in one line otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, open_dict, read_write

from cifar_run.constants import IMAGE_SHAPE, SOURCE_CLASSES
from cifar_run.errors import UserError

DEFAULT_SIZE = IMAGE_SHAPE[1]


def class_count(data: Any) -> int:
    """Classes of the `data` group's source, from a directory listing at most."""
    if data.name in SOURCE_CLASSES:
        return SOURCE_CLASSES[data.name]
    from cifar_run.data.folders import class_folders

    return len(class_folders(Path(str(data.root)).expanduser() / "train"))


def image_size(data: Any) -> int:
    """The side of the square images the model sees: data.image_size, else CIFAR's 32."""
    return int(data.get("image_size", DEFAULT_SIZE))


def size_setting(data: Any) -> str:
    """The setting the image size comes from, for messages: `data.image_size=64`, or the
    source (`data=cifar10`) whose images are 32x32."""
    if "image_size" in data:
        return f"data.image_size={data.image_size}"
    return f"data={data.name}"


def _source(data: Any) -> str:
    """Where the class count comes from, for messages."""
    if data.name in SOURCE_CLASSES:
        return f"data={data.name}"
    return f"class folders in {data.root}/train"


def check_model_keys(cfg: DictConfig) -> None:
    """`model.num_classes` / `model.input_size` set to a value the data contradicts: one line.
    Call after the data group is checked (an image folder's train/ exists)."""
    model = cfg.model
    classes = model.get("num_classes")
    if classes is not None:
        count = class_count(cfg.data)
        if classes != count:
            raise UserError(
                f"model.num_classes={classes}: the data has {count} classes "
                f"({_source(cfg.data)}); set it to null (follow the data) or {count}"
            )
    size = model.get("input_size")
    if size is not None:
        side = image_size(cfg.data)
        pair = list(size) if isinstance(size, (list, tuple, ListConfig)) else [size, size]
        if pair != [side, side]:
            raise UserError(
                f"model.input_size={size}: the images are {side}x{side} (data.image_size); "
                "set model.input_size=null to follow the data"
            )


def follow_data(cfg: DictConfig) -> DictConfig:
    """`cfg` with the model's null `num_classes` / `input_size` filled in from the data (a
    copy; `cfg` itself when there is nothing to fill)."""
    values = {"num_classes": class_count(cfg.data), "input_size": image_size(cfg.data)}
    fill = {k: v for k, v in values.items() if k in cfg.model and cfg.model[k] is None}
    if not fill:
        return cfg
    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        for key, value in fill.items():
            out.model[key] = value
    return out
