from __future__ import annotations

import torch

from cifar_run.augment import build_augment, random_crop


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    return one.repeat(8, 1, 1, 1)  # eight copies of one image


def test_standard_keeps_shape_dtype_and_varies_per_image() -> None:
    aug = build_augment({"name": "standard", "padding": 4, "flip": 0.5})
    x = _batch()
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in out}) > 1


def test_standard_is_reproducible_from_the_seed() -> None:
    aug = build_augment({"name": "standard", "padding": 4, "flip": 0.5})
    a = aug(_batch(), torch.Generator().manual_seed(7))
    b = aug(_batch(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_crop_matches_padding_then_slicing() -> None:
    x = _batch()
    out = random_crop(x, torch.Generator().manual_seed(3), 4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for img, src in zip(out, padded, strict=True):
        # Every crop is one of the 81 windows of the padded image.
        assert any(
            torch.equal(img, src[:, dy : dy + 32, dx : dx + 32])
            for dy in range(9)
            for dx in range(9)
        )


def test_none_is_no_augmentation() -> None:
    assert build_augment({"name": "none"}) is None
