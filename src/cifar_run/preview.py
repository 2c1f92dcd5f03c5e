"""preview=true: augment_preview.png (and mix_preview.png) instead of a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cifar_run.data.augment import grid_png, preview_png
from cifar_run.data.mix import build_mix, epoch_rng
from cifar_run.data.mix import preview_grid as mix_preview_grid
from cifar_run.data.sources import load_splits
from cifar_run.outputs import atomic

PREVIEW_IMAGES = 8  # rows of augment_preview.png


def write_preview(cfg: DictConfig, augment: Any, out_dir: Path | None) -> dict[str, Any]:
    """Write augment_preview.png: training images spread over the split, each with a few
    augmented draws (before normalization), from the run's augmentation seed."""
    images = load_splits(cfg.data).train.images
    pick = torch.linspace(0, len(images) - 1, min(PREVIEW_IMAGES, len(images))).long()
    png = preview_png(images[pick], augment, torch.Generator().manual_seed(cfg.seed + 1))
    mix = build_mix(cfg.get("mix"), num_classes=1)  # the preview draws no labels
    mix_png = None
    if mix is not None:
        rng = epoch_rng(torch.Generator().manual_seed(cfg.seed + 2))
        mix_png = grid_png(mix_preview_grid(images[pick], mix, rng))
    if out_dir is not None:
        path = Path(out_dir) / "augment_preview.png"
        atomic.write_bytes(path, png)
        print(f"augment preview: {path}", flush=True)
        if mix_png is not None:
            atomic.write_bytes(Path(out_dir) / "mix_preview.png", mix_png)
            print(f"mix preview: {Path(out_dir) / 'mix_preview.png'}", flush=True)
    return {"status": "preview"}
