"""Augmentation sets as batched tensor ops on uint8 images, on the training device.

Each set is a callable `(images uint8 (B,3,H,W), generator) -> images uint8 (B,3,H,W)`;
randomness is drawn per image from the generator, so two copies of one image in a batch get
different crops and flips, and a seed reproduces the whole stream. A set is a list of ops
built by its entry in `SETS` from the keys of `conf/augment/<name>.yaml`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from cifar_run.constants import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from cifar_run.errors import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index i of a row or column of length n, mirrored back into [0, n) at both ends
    without repeating the edge (torch's "reflect" padding; valid for -n < i < 2n - 1)."""
    return torch.where(i < 0, -i, torch.where(i > n - 1, 2 * (n - 1) - i, i))


def random_crop(
    x: torch.Tensor, g: torch.Generator, padding: int, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Pad by `padding` and take a random same-size crop per image (torchvision's
    RandomCrop(32, padding=4)) as one gather over flattened pixels: much faster on the CPU
    than four-way advanced indexing, and no Python loop over images.

    `padding_mode`: "zeros" (black border) or "reflect" (the edge mirrored without
    repeating the edge pixel, torchvision's padding_mode="reflect"). Reflection maps each
    crop pixel to its source pixel directly, so no padded copy is made (and no padding
    kernel is needed for uint8 on any device)."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    if padding_mode == "reflect":
        rows = _reflect(torch.arange(h, device=x.device) + (dy - padding)[:, None], h)
        cols = _reflect(torch.arange(w, device=x.device) + (dx - padding)[:, None], w)
        index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return x.flatten(2).gather(2, index).view(b, c, h, w)
    wp = w + 2 * padding
    padded = torch.nn.functional.pad(x, (padding,) * 4).flatten(2)
    window = (
        torch.arange(h, device=x.device)[:, None] * wp + torch.arange(w, device=x.device)
    ).flatten()
    index = (window + (dy * wp + dx)[:, None]).unsqueeze(1).expand(b, c, h * w)
    return padded.gather(2, index).view(b, c, h, w)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _warp(x: torch.Tensor, theta: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Resample every image through its own 2x3 affine map (output -> input coordinates in
    [-1, 1]), bilinear on float, rounded back to uint8: one grid_sample for the batch."""
    grid = F.affine_grid(theta.to(torch.float32), list(x.shape), align_corners=False)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    # A bilinear mix of values in [0, 255] (and zero fill) stays in range: rounding suffices.
    return out.round_().to(torch.uint8)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image i about its centre by `angles[i]` radians; corners outside are black."""
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(x, theta, "zeros")


def random_rotate(x: torch.Tensor, g: torch.Generator, degrees: float) -> torch.Tensor:
    """Rotate each image by an angle uniform in [-degrees, degrees] (torchvision's
    RandomRotation, but bilinear)."""
    if degrees == 0:
        return x
    angles = (torch.rand(x.shape[0], generator=g, device=x.device) * 2 - 1) * math.radians(degrees)
    return rotate(x, angles)


def _resized_crop_boxes(
    b: int,
    h: int,
    w: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    g: torch.Generator,
    device: torch.device,
    tries: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, height, width) per image, as torchvision's RandomResizedCrop.get_params
    draws them: `tries` candidates of random area and log-uniform aspect ratio, the first
    that fits, else the centre crop clamped to the allowed ratios; all images at once."""
    area = h * w
    rnd = torch.rand(2, b, tries, generator=g, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * rnd[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rnd[1])
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fit (0 if none)
    cw, ch, ok = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], fits.any(1)

    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw = torch.where(ok, cw, torch.full_like(cw, fw))
    ch = torch.where(ok, ch, torch.full_like(ch, fh))
    pos = torch.rand(2, b, generator=g, device=device)
    top = torch.where(ok, (pos[0] * (h - ch + 1)).floor(), torch.full_like(ch, (h - fh) // 2))
    left = torch.where(ok, (pos[1] * (w - cw + 1)).floor(), torch.full_like(cw, (w - fw) // 2))
    return top, left, ch, cw


def resized_crop(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, ch: torch.Tensor, cw: torch.Tensor
) -> torch.Tensor:
    """Crop box i (pixel `top`, `left`, height `ch`, width `cw`) of image i and resize it to
    the full image size, bilinear."""
    _, _, h, w = x.shape
    # Output column u samples input column left + (u + 0.5) * cw / w - 0.5, i.e. in normalized
    # coordinates x_in = x_out * cw / w + (2 * left + cw) / w - 1 (and the same for rows).
    zero = torch.zeros_like(cw)
    theta = torch.stack(
        [
            torch.stack([cw / w, zero, (2 * left + cw) / w - 1], 1),
            torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1),
        ],
        1,
    )
    # The outermost output pixels blend in the image pixels just outside the box (torchvision
    # clamps to the box: a sub-pixel difference); at the image border they replicate it.
    return _warp(x, theta, "border")


def random_resized_crop(
    x: torch.Tensor, g: torch.Generator, scale: Sequence[float], ratio: Sequence[float]
) -> torch.Tensor:
    """Crop a random box of `scale` x the area and aspect ratio in `ratio` from each image and
    resize it back to full size (torchvision's RandomResizedCrop, bilinear)."""
    b, _, h, w = x.shape
    return resized_crop(x, *_resized_crop_boxes(b, h, w, scale, ratio, g, x.device))


def cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Black out one `size` x `size` square per image, centred anywhere in the image and
    clipped at its border (DeVries & Taylor, 2017)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=g, device=x.device)
    cx = torch.randint(0, w, (b, 1), generator=g, device=x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows >= cy - size // 2) & (rows < cy - size // 2 + size)
    in_x = (cols >= cx - size // 2) & (cols < cx - size // 2 + size)
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None], 0)


def per_image(transform: Callable[[torch.Tensor], torch.Tensor]) -> Augment:
    """Apply a torchvision transform that draws its parameters from the global RNG to each
    image on the CPU (policies like AutoAugment have no batched form). One seed per batch
    comes from `g`, inside a forked RNG, so the stream is reproducible from `seed` and the
    global RNG is left as it was."""

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            out = torch.stack([transform(img) for img in x.cpu()])
        return out.to(x.device)

    return apply


@dataclass(frozen=True)
class Pipeline:
    """Ops applied in order; each draws its own randomness from the same generator."""

    ops: tuple[Augment, ...]

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for op in self.ops:
            x = op(x, g)
        return x


def _crop_flip(cfg: Mapping[str, Any]) -> list[Augment]:
    return [
        partial(
            random_crop,
            padding=int(cfg["padding"]),
            padding_mode=str(cfg.get("padding_mode", "zeros")),
        ),
        partial(random_flip, p=float(cfg["flip"])),
    ]


def _rotate(cfg: Mapping[str, Any]) -> list[Augment]:
    return [*_crop_flip(cfg), partial(random_rotate, degrees=float(cfg["degrees"]))]


def _resized_crop(cfg: Mapping[str, Any]) -> list[Augment]:
    scale, ratio = tuple(map(float, cfg["scale"])), tuple(map(float, cfg["ratio"]))
    return [
        partial(random_resized_crop, scale=scale, ratio=ratio),
        partial(random_flip, p=float(cfg["flip"])),
    ]


def _cutout(cfg: Mapping[str, Any]) -> list[Augment]:
    return [*_crop_flip(cfg), partial(cutout, size=int(cfg["size"]))]


def _autoaugment(cfg: Mapping[str, Any]) -> list[Augment]:
    from torchvision.transforms import v2

    policy = v2.AutoAugmentPolicy(str(cfg["policy"]))
    return [*_crop_flip(cfg), per_image(v2.AutoAugment(policy))]


def _trivialaugment(cfg: Mapping[str, Any]) -> list[Augment]:
    from torchvision.transforms import v2

    bins = int(cfg["num_magnitude_bins"])
    return [*_crop_flip(cfg), per_image(v2.TrivialAugmentWide(num_magnitude_bins=bins))]


# `augment.name` -> the ops of that set, built from the set's keys (conf/augment/<name>.yaml).
SETS: dict[str, Callable[[Mapping[str, Any]], list[Augment]]] = {
    "none": lambda cfg: [],
    "standard": _crop_flip,
    "rotate": _rotate,
    "resized_crop": _resized_crop,
    "cutout": _cutout,
    "autoaugment": _autoaugment,
    "trivialaugment": _trivialaugment,
}


def build_augment(cfg: Mapping[str, Any]) -> Augment | None:
    """The augmentation set named by `augment.name`; None when it has no ops (`none`)."""
    name = cfg["name"]
    if name not in SETS:
        raise UserError(
            f"augment.name={name}: unknown augmentation set; allowed: {', '.join(SETS)}"
        )
    ops = SETS[name](cfg)
    return Pipeline(tuple(ops)) if ops else None


def normalization(
    name: str, train_images: torch.Tensor, source: str = "cifar10"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for `augment.normalize`; `cifar` is CIFAR-100's statistics
    for data=cifar100 (`source`, data.name), CIFAR-10's for every other source."""
    if name == "cifar" and source == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    if name == "cifar":
        return CIFAR10_MEAN, CIFAR10_STD
    if name == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if name == "dataset":
        x = train_images.double() / 255
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())
    raise UserError(f"augment.normalize={name}: unknown; allowed: cifar, half, dataset, imagenet")


def preview_grid(
    images: torch.Tensor,
    augment: Augment | None,
    g: torch.Generator,
    *,
    draws: int = 3,
    zoom: int = 4,
) -> torch.Tensor:
    """uint8 (3, H', W') grid: one row per image, the original first, then `draws` augmented
    versions of it; pixels enlarged `zoom` times so 32x32 images are visible."""
    n = len(images)
    copies = images.repeat_interleave(draws, 0)
    augmented = augment(copies, g) if augment is not None else copies
    rows = torch.cat([images[:, None], augmented.view(n, draws, *images.shape[1:])], 1)
    return image_grid(rows, zoom)


def image_grid(rows: torch.Tensor, zoom: int = 4) -> torch.Tensor:
    """uint8 (n, k, 3, H, W) images -> one uint8 (3, H', W') grid of n rows of k, white
    gaps, pixels enlarged `zoom` times so 32x32 images are visible."""
    from torchvision.utils import make_grid

    grid = make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=255)
    return grid.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)


def grid_png(grid: torch.Tensor) -> bytes:
    """A uint8 (3, H, W) grid encoded as PNG."""
    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, grid.permute(1, 2, 0).cpu().numpy(), format="png")
    return buf.getvalue()


def preview_png(
    images: torch.Tensor, augment: Augment | None, g: torch.Generator, draws: int = 3
) -> bytes:
    """`preview_grid` encoded as PNG."""
    return grid_png(preview_grid(images, augment, g, draws=draws))
