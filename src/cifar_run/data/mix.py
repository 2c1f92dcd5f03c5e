"""Batch mixing of training batches: mixup and CutMix, with soft labels.

`mixup_cutmix` picks one of the two per mixed batch (timm's `switch_prob`). A mixed batch
pairs each image with the one at the mirrored position in the batch
(`x.flip(0)`, as timm does: the batch order is already random) and blends the pair with one
weight `lam ~ Beta(alpha, alpha)` per batch: mixup interpolates the whole images, CutMix
pastes a box of the partner whose area is `1 - lam` of the image (the box is clipped at the
border and `lam` recomputed from the area actually pasted). The labels become the same blend
of the two one-hot vectors, which cross-entropy takes as class probabilities.

Draws come from a `random.Random` per epoch, seeded from a torch CPU generator that the run
checkpoints: `lam` and the box are host numbers, so mixing adds no device synchronisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from cifar_run.constants import MIX_MODES


@dataclass(frozen=True)
class Mix:
    mode: str  # "mixup" | "cutmix" | "mixup_cutmix" (one or the other per batch)
    alpha: float  # Beta(alpha, alpha) concentration, > 0 (mixup's under mixup_cutmix)
    prob: float  # probability that a batch is mixed at all
    num_classes: int
    cutmix_alpha: float = 1.0  # CutMix's concentration under mixup_cutmix
    switch_prob: float = 0.5  # under mixup_cutmix: probability of CutMix for a mixed batch

    def __post_init__(self) -> None:
        if self.mode not in MIX_MODES[1:]:
            raise ValueError(f"mix mode {self.mode!r}: allowed: {', '.join(MIX_MODES[1:])}")

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,C,H,W) float images and (B,) class labels -> mixed images and (B, classes)
        label probabilities. Unmixed batches (probability 1 - prob) get one-hot labels, so
        every batch of an epoch has the same label shape."""
        target = F.one_hot(y, self.num_classes).to(torch.float32)
        if rng.random() >= self.prob:
            return x, target
        mode, alpha = self.mode, self.alpha
        if mode == "mixup_cutmix":  # timm's switch: one of the two per batch
            cut = rng.random() < self.switch_prob
            mode, alpha = ("cutmix", self.cutmix_alpha) if cut else ("mixup", self.alpha)
        lam = rng.betavariate(alpha, alpha)
        partner = x.flip(0)
        if mode == "mixup":
            x = torch.lerp(partner, x, lam)  # lam * x + (1 - lam) * partner
        else:
            x, lam = _paste_box(x, partner, lam, rng)
        return x, torch.lerp(target.flip(0), target, lam)


def _paste_box(
    x: torch.Tensor, partner: torch.Tensor, lam: float, rng: random.Random
) -> tuple[torch.Tensor, float]:
    """CutMix's box: sides sqrt(1 - lam) of the image's, centred uniformly, clipped at the
    border; returns the images and the share of each image left unpasted."""
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    if y1 <= y0 or x1 <= x0:
        return x, 1.0
    x = x.clone()  # the loader's batch is fresh, but a caller's tensor must stay as it was
    x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return x, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def preview_grid(
    images: torch.Tensor, mix: Mix, rng: random.Random, *, draws: int = 3, zoom: int = 4
) -> torch.Tensor:
    """uint8 (3, H', W') grid: one row per image, the image, its partner (the images
    reversed, as in a batch), then `draws` mixes of the two (every draw mixed, whatever
    `mix.prob`)."""
    from cifar_run.data.augment import image_grid

    always = replace(mix, prob=1.0)
    partners = images.flip(0)
    no_labels = torch.zeros(2, dtype=torch.long)
    rows = []
    for a, b in zip(images, partners, strict=True):
        pair = torch.stack([a, b]).float()
        mixed = [always(pair, no_labels, rng)[0][0] for _ in range(draws)]
        row = torch.stack([a, b, *(m.round().clamp(0, 255).to(torch.uint8) for m in mixed)])
        rows.append(row)
    return image_grid(torch.stack(rows), zoom)


def epoch_rng(generator: torch.Generator) -> random.Random:
    """One epoch's source of mixing draws, seeded from the checkpointed `generator`."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


def build_mix(cfg: Any, num_classes: int) -> Mix | None:
    """The `mix` group as a Mix, or None for `mix=none` (and a saved config that lacks it)."""
    if cfg is None or cfg.name == "none":
        return None
    extra = {k: float(cfg[k]) for k in ("cutmix_alpha", "switch_prob") if k in cfg}
    return Mix(cfg.name, float(cfg.alpha), float(cfg.prob), num_classes, **extra)
