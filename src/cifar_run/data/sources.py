"""Datasets as uint8 tensors: CIFAR-10 and CIFAR-100 via torchvision, image folders decoded
once (at `data.image_size`) and cached.

Everything downstream sees `Splits`: train / val / test as (N, 3, H, W) uint8 images and
int64 labels (32x32 for CIFAR). Images are decoded once; an epoch never touches a file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_run.constants import CIFAR10_CLASSES, IMAGE_SHAPE
from cifar_run.data.folders import class_folders, image_files
from cifar_run.data.images import decode
from cifar_run.errors import UserError
from cifar_run.outputs import atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_SIZE = IMAGE_SHAPE[1]  # data.image_size when the data group has none (CIFAR)


@dataclass
class ArraySplit:
    """Images as (N, 3, H, W) uint8 and labels as (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, index: torch.Tensor) -> ArraySplit:
        return ArraySplit(self.images[index], self.labels[index])


@dataclass
class Splits:
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    classes: Sequence[str]


# ---------------------------------------------------------------------------------------------
# Sources

# data.name -> (torchvision class, the name users know, the archive torchvision downloads)
CIFAR_SOURCES = {
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python.tar.gz"),
}


def load_cifar(
    name: str, root: str | os.PathLike, download: bool = True
) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """CIFAR-10 or CIFAR-100 (`name`: cifar10, cifar100; CIFAR-100 with its 100 fine labels)
    through torchvision.datasets, downloading into `root` when missing."""
    import torchvision.datasets

    cls_name, title, archive = CIFAR_SOURCES[name]
    dataset = getattr(torchvision.datasets, cls_name)
    try:
        train = dataset(str(root), train=True, download=download)
        test = dataset(str(root), train=False, download=download)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"data.root={root}: {title} is not there and could not be downloaded ({reason}); "
            f"put {archive} (https://www.cs.toronto.edu/~kriz/cifar.html) into "
            "that folder, or use data=imagefolder data.root=<folder with train/ and test/>"
        ) from None

    def to_split(ds: Any) -> ArraySplit:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ArraySplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))

    classes = list(CIFAR10_CLASSES) if name == "cifar10" else list(train.classes)
    return to_split(train), to_split(test), classes


def load_cifar10(root: str | os.PathLike, download: bool = True) -> tuple[ArraySplit, ArraySplit]:
    """CIFAR-10 through `torchvision.datasets.CIFAR10`, downloading into `root` when missing."""
    train, test, _ = load_cifar("cifar10", root, download)
    return train, test


def _list_split(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = class_folders(folder)
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        items.extend((f, label) for f in image_files(os.path.join(folder, name)))
    return classes, items


def _fingerprint(root: Path, items: list[tuple[str, int]], size: int = DEFAULT_SIZE) -> str:
    """Changes when any file is added, removed, renamed, resized or touched, and with the
    size the images are decoded at.

    One stat per file, cheap next to decoding. At the default size the hashed text is the
    one the caches already written are named by, so they stay valid.
    """
    prefix = len(os.path.join(str(root), ""))
    stat = os.stat
    lines = []
    for path, label in items:
        st = stat(path)
        lines.append(f"{path[prefix:]}|{label}|{st.st_size}|{st.st_mtime_ns}\n")
    sized = "" if size == DEFAULT_SIZE else f":{size}x{size}"
    h = hashlib.sha256(f"{CACHE_VERSION}:{root.resolve()}{sized}".encode())
    h.update("".join(lines).encode())
    return h.hexdigest()[:24]


def _decode(paths: list[str], size: int = DEFAULT_SIZE) -> torch.Tensor:
    """Every image as (N, 3, size, size) uint8 (data.images.decode)."""
    return decode(paths, size)


def load_imagefolder(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = DEFAULT_SIZE,
) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """`root/train/<class>/*` and `root/test/<class>/*`, decoded once at `image_size` x
    `image_size` (data.images: others resized) and cached as uint8."""
    root = Path(root).expanduser()
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise UserError(
                f"data.root={root}: no '{part}' folder; expected {root}/train/<class>/*.jpg "
                f"and {root}/test/<class>/*.jpg"
            )
    classes, train_items = _list_split(root / "train")
    test_classes, test_items = _list_split(root / "test")
    if not classes or not train_items:
        raise UserError(f"data.root={root}: train/ holds no class folders with images")
    if test_classes != classes:
        raise UserError(
            f"data.root={root}: train/ and test/ have different class folders "
            f"({classes} vs {test_classes})"
        )

    key = _fingerprint(root, train_items + test_items, image_size)
    cache = Path(cache_dir).expanduser() / f"imagefolder-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                arrays = {k: torch.from_numpy(z[k]) for k in ("xtr", "ytr", "xte", "yte")}
            log.info("loaded %s from cache %s", root, cache)
            return (
                ArraySplit(arrays["xtr"], arrays["ytr"]),
                ArraySplit(arrays["xte"], arrays["yte"]),
                classes,
            )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache %s (%s); decoding again", cache, exc)

    log.info(
        "decoding %d images under %s at %dx%d (once; cached afterwards)",
        len(train_items) + len(test_items),
        root,
        image_size,
        image_size,
    )
    train = ArraySplit(
        _decode([p for p, _ in train_items], image_size),
        torch.tensor([label for _, label in train_items], dtype=torch.int64),
    )
    test = ArraySplit(
        _decode([p for p, _ in test_items], image_size),
        torch.tensor([label for _, label in test_items], dtype=torch.int64),
    )
    if cache is not None:
        try:
            buf = io.BytesIO()
            np.savez(
                buf,
                xtr=train.images.numpy(),
                ytr=train.labels.numpy(),
                xte=test.images.numpy(),
                yte=test.labels.numpy(),
            )
            atomic.write_bytes(cache, buf.getvalue())
        except OSError as exc:  # a read-only home must not stop a run
            log.warning("could not write the decode cache %s (%s)", cache, exc)
    return train, test, classes


# ---------------------------------------------------------------------------------------------
# Subsets and the validation split


def first_per_class(split: ArraySplit, per_class: int) -> ArraySplit:
    """The first `per_class` images of every class, in dataset order (deterministic)."""
    keep = []
    for label in torch.unique(split.labels):
        idx = torch.nonzero(split.labels == label).flatten()[:per_class]
        keep.append(idx)
    return split.take(torch.sort(torch.cat(keep)).values)


def stratified_split(
    labels: torch.Tensor, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `val_size` images drawn at random per class in proportion."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / len(labels)
    quota = exact.floor().long()
    # Largest remainders get the leftover images, so the total is exactly val_size.
    leftover = val_size - int(quota.sum())
    if leftover > 0:
        quota[torch.argsort(exact - quota, descending=True)[:leftover]] += 1
    val_parts, train_parts = [], []
    for cls, q in zip(classes.tolist(), quota.tolist(), strict=True):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_parts.append(idx[:q])
        train_parts.append(idx[q:])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def make_splits(
    train: ArraySplit,
    test: ArraySplit,
    classes: Sequence[str],
    *,
    val_size: int | float,
    subset: int | None,
    split_seed: int,
) -> Splits:
    """Apply `subset` (per class, train and test), then hold out the validation images.

    `val_size` is a count of images of the full training set, or a fraction in (0, 1).
    With a subset the held-out fraction stays the same, so one command works for smoke runs
    and real runs alike (val_size 10000 of 50000 with subset=20 holds out 40 of 200).
    """
    full_train = len(train)
    if isinstance(val_size, float):
        fraction = val_size
    else:
        if val_size >= full_train:
            raise UserError(
                f"data.val_size={val_size}: leaves no training images (the training set has "
                f"{full_train}); use 0 <= val_size < {full_train} or a fraction in (0, 1)"
            )
        fraction = val_size / full_train
    if subset is not None:
        train = first_per_class(train, subset)
        test = first_per_class(test, subset)
    n_val = round(fraction * len(train))
    if n_val >= len(train):
        raise UserError(
            f"data.val_size={val_size}: leaves no training images of the {len(train)} "
            "in the subset; use a smaller val_size"
        )
    if n_val == 0:
        # No validation split: the last epoch is kept (the README says so).
        return Splits(train, ArraySplit(train.images[:0], train.labels[:0]), test, list(classes))
    train_idx, val_idx = stratified_split(train.labels, n_val, split_seed)
    return Splits(train.take(train_idx), train.take(val_idx), test, list(classes))


def load_data(
    name: str,
    root: str | os.PathLike,
    *,
    val_size: int | float,
    subset: int | None,
    split_seed: int,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int = DEFAULT_SIZE,
) -> Splits:
    """Load the named source and split it into train / val / test."""
    if name in CIFAR_SOURCES:
        train, test, classes = load_cifar(name, root, download=download)
    elif name == "imagefolder":
        train, test, classes = load_imagefolder(root, cache_dir, image_size)
    else:
        allowed = ", ".join([*CIFAR_SOURCES, "imagefolder"])
        raise UserError(f"data.name={name}: unknown source; allowed: {allowed}")
    return make_splits(
        train, test, classes, val_size=val_size, subset=subset, split_seed=split_seed
    )


def load_splits(data: Mapping[str, Any]) -> Splits:
    """The train/val/test splits a `data` config group entry describes."""
    t_load = time.perf_counter()
    splits = load_data(
        data["name"],
        data["root"],
        val_size=data["val_size"],
        subset=data["subset"],
        split_seed=data["split_seed"],
        cache_dir=data["cache_dir"],
        download=data["download"],
        image_size=data.get("image_size", DEFAULT_SIZE),
    )
    log.info(
        "data: %d train / %d val / %d test images (%.1f s)",
        len(splits.train),
        len(splits.val),
        len(splits.test),
        time.perf_counter() - t_load,
    )
    return splits
