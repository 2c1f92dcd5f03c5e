"""Image folders in torchvision's ImageFolder layout, listed and checked before any decoding.

`root/train/<class>/*` and `root/test/<class>/*`: the class folders name the classes (sorted;
a class's label is its position), the image files in them are its examples. Directory
listings alone, no torch: the config checks count classes and images with it before anything
heavy is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cifar_run.constants import IMAGE_SUFFIXES
from cifar_run.errors import UserError

SPLITS = ("train", "test")


@dataclass
class Listing:
    """The classes of an image folder and (path, label) of every image file of each split."""

    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def class_folders(split: str | os.PathLike) -> list[str]:
    """The class names of a split folder (train/ or test/): its sub-folders, sorted. Hidden
    folders (.ipynb_checkpoints, ...) are no classes."""
    return sorted(d.name for d in os.scandir(split) if d.is_dir() and not d.name.startswith("."))


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files directly in `folder` (by suffix, IMAGE_SUFFIXES), sorted, as strings
    (a Path per file would cost more than the listing)."""
    return sorted(
        e.path
        for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
    )


def count_images(split: str | os.PathLike) -> int:
    """Images in the class folders of a split folder."""
    return sum(len(image_files(Path(split) / name)) for name in class_folders(split))


def no_images(class_dir: str, readable: bool = False) -> UserError:
    """A class folder without image files (`readable`: without one that could be read): its
    class could be neither learned nor tested."""
    what = "readable image files" if readable else f"image files ({', '.join(IMAGE_SUFFIXES)})"
    return UserError(
        f"data.root: class folder {class_dir} holds no {what}; a class without images can be "
        "neither learned nor tested: add images, or remove the class folder from train/ and "
        "test/"
    )


def list_split(folder: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) of every image file) of one split folder, sorted; a class
    folder without image files is a UserError naming it."""
    classes = class_folders(folder)
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        files = image_files(class_dir)
        if not files:
            raise no_images(class_dir)
        items.extend((f, label) for f in files)
    return classes, items


def list_imagefolder(root: str | os.PathLike) -> Listing:
    """Both splits of the image folder `root`, checked: it holds train/ and test/ with the
    same class folders, at least two, each with image files. Errors name `root` as given."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"data.root={root}: no such folder; point it at a folder holding "
            "train/<class>/* and test/<class>/*"
        )
    for part in SPLITS:
        if not (folder / part).is_dir():
            raise UserError(
                f"data.root={root}: no '{part}' folder; expected {root}/train/<class>/*.jpg "
                f"and {root}/test/<class>/*.jpg"
            )
    classes = class_folders(folder / "train")
    if len(classes) < 2:
        raise UserError(
            f"data.root={root}: train/ holds {len(classes)} class folder(s); a classifier "
            "needs at least 2 (one folder of images per class)"
        )
    test_classes = class_folders(folder / "test")
    if test_classes != classes:
        only_one = sorted(set(classes) ^ set(test_classes))
        raise UserError(
            f"data.root={root}: train/ and test/ have different class folders "
            f"({', '.join(only_one[:5])} in only one of them); both need the same classes"
        )
    _, train = list_split(folder / "train")
    _, test = list_split(folder / "test")
    return Listing(classes, train, test)
