"""Image files as uint8 arrays of one size: how image folders are decoded for training and how
`cifar-run predict` reads its images, so both see the same pixels.

An image whose side differs from the size asked for is resized with torchvision's transforms:
its shorter side to `size` (bilinear, antialiased), then the centre `size` x `size` square
(Resize + CenterCrop, the usual evaluation transform). Images already at that size are taken
as they are, pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=8)
def _resizer(size: int) -> Callable[[Any], Any]:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
        ]
    )


def read_image(path: str, size: int) -> np.ndarray:
    """The image at `path` as (size, size, 3) uint8 RGB. A file that is not a readable image
    raises whatever Pillow raises for it (OSError for most, DecompressionBombError, ...)."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if rgb.size != (size, size):
        rgb = _resizer(size)(rgb)
    return np.asarray(rgb)


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
