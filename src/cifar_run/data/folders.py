"""What an image folder holds, from directory listings alone (no decoding, no torch): the
config checks count classes and images with it before anything heavy is imported."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_run.constants import IMAGE_SUFFIXES


def class_folders(split: str | os.PathLike) -> list[str]:
    """The class names of a split folder (train/ or test/): its sub-folders, sorted; a
    class's label is its position in this list. Hidden folders (.ipynb_checkpoints, ...)
    are no classes."""
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
