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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_run.constants import CIFAR10_CLASSES, IMAGE_SHAPE
from cifar_run.data.folders import list_imagefolder, no_images
from cifar_run.data.images import read_image, reason
from cifar_run.errors import UserError
from cifar_run.outputs import atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_SIZE = IMAGE_SHAPE[1]  # data.image_size when the data group has none (CIFAR)


@dataclass
class ArraySplit:
    """Images as (N, 3, H, W) uint8 and labels as (N,) int64; `skipped`: the files of the
    split left out as unreadable (image folders)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[str, ...] = ()

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
    skipped: Sequence[str] = ()  # unreadable files left out of train and test


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


def _unreadable(path: str, exc: Exception) -> str:
    """Why `path` could not be decoded, in a few words."""
    from PIL import UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "an empty file"
    except OSError:
        pass
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return reason(exc)


def _decode(
    paths: list[str], size: int = DEFAULT_SIZE, strict: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """(every readable image as (N, 3, size, size) uint8, resized by data.images, the paths
    that could not be read), decoded by Pillow in this thread. A file that cannot be read
    (truncated, empty, not an image) is a UserError naming it with `strict`; otherwise it is
    left out with a warning.

    One thread on purpose: a 32x32 JPEG decodes so quickly that the per-image Python work
    between decodes dominates, and in a thread pool the threads mostly wait for the GIL,
    which makes two threads slower than one.
    """
    images, unreadable = [], []
    for path in paths:
        try:
            images.append(read_image(path, size))
        except (UserError, MemoryError):
            raise
        except Exception as exc:  # Pillow reports damaged files as OSError, ValueError, ...
            reason = _unreadable(path, exc)
            if strict:
                raise UserError(
                    f"data.strict=true: cannot read image {path} ({reason}); replace or remove "
                    "the file, or set data.strict=false to skip unreadable files with a warning"
                ) from None
            log.warning("skipping unreadable image %s (%s)", path, reason)
            unreadable.append(path)
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), unreadable
    stacked = np.stack(images)
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))), unreadable


def _decode_split(
    folder: Path, classes: list[str], items: list[tuple[str, int]], size: int, strict: bool
) -> ArraySplit:
    """The images of one split; every class must keep at least one after unreadable files
    are left out."""
    images, unreadable = _decode([p for p, _ in items], size, strict=strict)
    left_out = set(unreadable)
    labels = torch.tensor([label for p, label in items if p not in left_out], dtype=torch.int64)
    if unreadable:
        present = set(labels.tolist())
        for label, name in enumerate(classes):
            if label not in present:
                raise no_images(str(folder / name), readable=True)
    return ArraySplit(images, labels, skipped=tuple(unreadable))


_CACHE_KEYS = ("xtr", "ytr", "xte", "yte")


def _read_cache(cache: Path, num_classes: int, size: int) -> tuple[ArraySplit, ArraySplit] | None:
    """The decoded splits from `cache`, or None with a warning when it cannot be used."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in _CACHE_KEYS}
        splits = (
            ArraySplit(arrays["xtr"], arrays["ytr"]),
            ArraySplit(arrays["xte"], arrays["yte"]),
        )
        for split in splits:
            images, labels = split.images, split.labels
            if (
                images.dtype != torch.uint8
                or tuple(images.shape[1:]) != (3, size, size)
                or labels.dtype != torch.int64
                or labels.shape != images.shape[:1]
                or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes)
            ):
                raise ValueError("arrays of the wrong shape or type")
    except Exception as exc:  # a truncated or damaged file fails in many ways (zip, zlib, ...)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "the decode cache %s cannot be read (%s); decoding the images again", cache, text
        )
        return None
    return splits


def _write_cache(cache: Path, train: ArraySplit, test: ArraySplit) -> None:
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
    except OSError as exc:  # a read-only or full home must not stop a run
        log.warning("could not write the decode cache %s (%s)", cache, exc)


def load_imagefolder(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = DEFAULT_SIZE,
    strict: bool = False,
) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """`root/train/<class>/*` and `root/test/<class>/*`, decoded once at `image_size` x
    `image_size` (data.images: others resized) and cached as uint8.

    Unreadable files are left out with a warning (each split's `skipped` names them), or
    with `strict` stop the load with a UserError. A folder with unreadable files is decoded
    again every time, never cached, so that every run warns about them.
    """
    listing = list_imagefolder(root)
    root = Path(root).expanduser()
    classes = listing.classes
    key = _fingerprint(root, listing.train + listing.test, image_size)
    cache = Path(cache_dir).expanduser() / f"imagefolder-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        cached = _read_cache(cache, len(classes), image_size)
        if cached is not None:
            log.info("loaded %s from cache %s", root, cache)
            return cached[0], cached[1], classes

    log.info(
        "decoding %d images under %s at %dx%d (once; cached afterwards)",
        len(listing.train) + len(listing.test),
        root,
        image_size,
        image_size,
    )
    train = _decode_split(root / "train", classes, listing.train, image_size, strict)
    test = _decode_split(root / "test", classes, listing.test, image_size, strict)
    if cache is not None and not (train.skipped or test.skipped):
        _write_cache(cache, train, test)
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
    strict: bool = False,
) -> Splits:
    """Load the named source and split it into train / val / test (`strict`: an unreadable
    file of an image folder is an error rather than left out)."""
    if name in CIFAR_SOURCES:
        train, test, classes = load_cifar(name, root, download=download)
    elif name == "imagefolder":
        train, test, classes = load_imagefolder(root, cache_dir, image_size, strict=strict)
    else:
        allowed = ", ".join([*CIFAR_SOURCES, "imagefolder"])
        raise UserError(f"data.name={name}: unknown source; allowed: {allowed}")
    splits = make_splits(
        train, test, classes, val_size=val_size, subset=subset, split_seed=split_seed
    )
    return replace(splits, skipped=(*train.skipped, *test.skipped))


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
        strict=bool(data.get("strict", False)),
    )
    if splits.skipped:
        log.warning(
            "%d unreadable image file(s) skipped (each named above; results.json: "
            "skipped_images); data.strict=true stops at the first instead",
            len(splits.skipped),
        )
    log.info(
        "data: %d train / %d val / %d test images (%.1f s)",
        len(splits.train),
        len(splits.val),
        len(splits.test),
        time.perf_counter() - t_load,
    )
    return splits
