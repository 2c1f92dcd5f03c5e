"""Image folders of other shapes, made from the committed subset (tests/data): other class
counts, other and mixed image sizes, corrupt files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .conftest import TEST_DATA

Transform = Callable[["Image.Image"], "Image.Image"]  # noqa: F821 (PIL, imported lazily)


def copy_classes(root: Path, classes: list[str]) -> Path:
    """root/train and root/test holding these classes of the committed subset, as they are."""
    for split in ("train", "test"):
        for name in classes:
            shutil.copytree(TEST_DATA / split / name, root / split / name)
    return root


def add_class(root: Path, name: str, source: str, transform: Transform) -> None:
    """A new class `name`: the images of class `source`, each transformed (saved as PNG)."""
    from PIL import Image

    for split in ("train", "test"):
        (root / split / name).mkdir(parents=True)
        for path in sorted((TEST_DATA / split / source).iterdir()):
            with Image.open(path) as img:
                transform(img.convert("RGB")).save(root / split / name / f"{path.stem}.png")


def resized_copy(root: Path, size: tuple[int, int] | Callable[[int], tuple[int, int]]) -> Path:
    """The whole committed subset with every image resized to `size` (or to `size(i)` for
    the i-th image of its class folder: mixed sizes), as PNG."""
    from PIL import Image

    for split in ("train", "test"):
        for folder in sorted((TEST_DATA / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for i, path in enumerate(sorted(folder.iterdir())):
                wh = size(i) if callable(size) else size
                with Image.open(path) as img:
                    img.convert("RGB").resize(wh, Image.BICUBIC).save(
                        root / split / folder.name / f"{path.stem}.png"
                    )
    return root


def corrupt(path: Path) -> Path:
    """A file with an image's name and no image in it."""
    path.write_bytes(b"\xff\xd8\xff not a jpeg at all" * 3)
    return path


def recount(run_dir: Path) -> tuple[list[str], list[list[int]]]:
    """The test split predicted again from the run's best.pt, as the run saw it (its
    config.yaml: data, subset, image size; CIFAR-10 normalization), counted per class:
    (class names, confusion rows true x predicted). Independent of the run's evaluation."""
    from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD
    from cifar_run.data.sources import load_splits
    from cifar_run.models import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.augment.normalize == "cifar"
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True))
    splits = load_splits(cfg.data)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model.eval()(((splits.test.images.float() / 255) - mean) / std).argmax(1)
    k = len(splits.classes)
    y = splits.test.labels
    rows = [[int(((y == i) & (pred == j)).sum()) for j in range(k)] for i in range(k)]
    return list(splits.classes), rows


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
