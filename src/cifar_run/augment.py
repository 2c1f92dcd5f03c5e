"""Augmentation as batched tensor ops on uint8 images, on the training device.

Each set is a callable `(images uint8 (B,3,H,W), generator) -> images uint8 (B,3,H,W)`;
randomness is drawn per image from the generator, so two copies of one image in a batch get
different crops and flips, and a seed reproduces the whole stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD
from cifar_run.errors import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_crop(x: torch.Tensor, g: torch.Generator, padding: int) -> torch.Tensor:
    """Zero-pad by `padding` and take a random same-size crop per image (torchvision's
    RandomCrop(32, padding=4)) as one gather over flattened pixels: ten times faster on CPU
    than four-way advanced indexing, and no Python loop over images."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    wp = w + 2 * padding
    padded = torch.nn.functional.pad(x, (padding,) * 4).flatten(2)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    window = (
        torch.arange(h, device=x.device)[:, None] * wp + torch.arange(w, device=x.device)
    ).flatten()
    index = (window + (dy * wp + dx)[:, None]).unsqueeze(1).expand(b, c, h * w)
    return padded.gather(2, index).view(b, c, h, w)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def build_augment(cfg: Mapping[str, Any]) -> Augment | None:
    """The augmentation set named by `augment.name`; None for `none`."""
    name = cfg["name"]
    if name == "none":
        return None
    if name == "standard":
        padding = int(cfg.get("padding", 4))
        flip_p = float(cfg.get("flip", 0.5))

        def standard(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            return random_flip(random_crop(x, g, padding), g, flip_p)

        return standard
    raise UserError(f"augment.name={name}: unknown augmentation set; allowed: none, standard")


def normalization(
    name: str, train_images: torch.Tensor
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for `augment.normalize`."""
    if name == "cifar":
        return CIFAR10_MEAN, CIFAR10_STD
    if name == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if name == "dataset":
        x = train_images.double() / 255
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())
    raise UserError(f"augment.normalize={name}: unknown; allowed: cifar, half, dataset")
