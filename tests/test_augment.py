from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cifar_run.config.compose import CONF_DIR
from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from cifar_run.data.augment import (
    SETS,
    _resized_crop_boxes,
    build_augment,
    cutout,
    normalization,
    preview_grid,
    preview_png,
    random_crop,
    random_resized_crop,
    random_rotate,
    resized_crop,
    rotate,
)
from cifar_run.errors import UserError
from cifar_run.run import run

from .conftest import TINY, compose_cfg

AUGMENT_FILES = sorted((CONF_DIR / "augment").glob("*.yaml"))
SET_FILES = [p for p in AUGMENT_FILES if p.stem != "none"]


def _batch(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    return one.repeat(n, 1, 1, 1)  # n copies of one image


def _set(path: Path):
    return build_augment(OmegaConf.load(path))


def test_every_config_file_is_a_set_and_every_set_has_a_file() -> None:
    assert {p.stem for p in AUGMENT_FILES} == set(SETS)
    for path in AUGMENT_FILES:
        assert OmegaConf.load(path).name == path.stem


@pytest.mark.parametrize("path", SET_FILES, ids=[p.stem for p in SET_FILES])
def test_set_keeps_shape_dtype_and_varies_per_image(path: Path) -> None:
    x = _batch()
    out = _set(path)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # Eight copies of one image come out as (almost all) different images.
    assert len({o.numpy().tobytes() for o in out}) >= 6
    assert torch.equal(x, _batch())  # the input batch is left alone


@pytest.mark.parametrize("path", SET_FILES, ids=[p.stem for p in SET_FILES])
def test_set_is_reproducible_from_the_seed(path: Path) -> None:
    aug = _set(path)
    a = aug(_batch(), torch.Generator().manual_seed(7))
    b = aug(_batch(), torch.Generator().manual_seed(7))
    c = aug(_batch(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_none_is_no_augmentation() -> None:
    assert build_augment(OmegaConf.load(CONF_DIR / "augment" / "none.yaml")) is None


def test_unknown_set_lists_the_choices() -> None:
    with pytest.raises(UserError) as err:
        build_augment({"name": "mixup"})
    assert "augment.name=mixup" in str(err.value) and "resized_crop" in str(err.value)


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


def test_reflect_crop_matches_torchvision_reflect_padding() -> None:
    from torchvision.transforms import v2

    x = _batch()
    out = random_crop(x, torch.Generator().manual_seed(3), 4, padding_mode="reflect")
    padded = v2.Pad(4, padding_mode="reflect")(x)  # torchvision's RandomCrop padding
    assert not torch.equal(padded, torch.nn.functional.pad(x, (4, 4, 4, 4)))
    for img, src in zip(out, padded, strict=True):
        assert any(
            torch.equal(img, src[:, dy : dy + 32, dx : dx + 32])
            for dy in range(9)
            for dx in range(9)
        )
    # A reflected border repeats image content, never the black of zero padding.
    bright = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    assert (random_crop(bright, torch.Generator().manual_seed(0), 4, "reflect") == 200).all()
    assert (random_crop(bright, torch.Generator().manual_seed(0), 4, "zeros") == 0).any()


def test_padding_mode_reaches_the_crop_from_the_config() -> None:
    bright = torch.full((16, 3, 32, 32), 200, dtype=torch.uint8)
    cfg = {"name": "standard", "padding": 4, "flip": 0.5, "padding_mode": "reflect"}
    assert (build_augment(cfg)(bright, torch.Generator().manual_seed(0)) == 200).all()
    cfg["padding_mode"] = "zeros"
    assert (build_augment(cfg)(bright, torch.Generator().manual_seed(0)) == 0).any()


def test_rotate_by_a_quarter_turn_moves_every_pixel_exactly() -> None:
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = rotate(x, torch.tensor([math.pi / 2, -math.pi / 2]))
    assert torch.equal(out[0], torch.rot90(x[0], 1, (1, 2)))
    assert torch.equal(out[1], torch.rot90(x[1], -1, (1, 2)))


def test_rotation_stays_within_degrees_and_fills_black() -> None:
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_rotate(x, g, 0.0), x)
    small = random_rotate(x, g, 10.0)
    # A 10-degree turn keeps the central disc and blackens at most a sliver of each corner.
    assert (small[:, :, 8:24, 8:24] == 200).all()
    assert (small == 0).float().mean() < 0.05
    big = random_rotate(x, g, 45.0)
    assert (big[:, :, 0, 0] < 200).float().mean() > 0.5  # corners rotate out of the image


def test_resized_crop_of_the_whole_image_is_the_identity() -> None:
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(random_resized_crop(x, torch.Generator(), (1.0, 1.0), (1.0, 1.0)), x)


def test_resized_crop_resizes_the_box_like_interpolate() -> None:
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    top, left, size = torch.tensor([5.0]), torch.tensor([3.0]), torch.tensor([16.0])
    out = resized_crop(x, top, left, size, size)
    ref = F.interpolate(x[:, :, 5:21, 3:19].float(), size=(32, 32), mode="bilinear")
    # Inside the box the two agree up to rounding; the outermost rows and columns differ in
    # that grid_sample blends in the pixels just outside the box (interpolate clamps instead).
    diff = (out.float() - ref.round())[:, :, 1:-1, 1:-1].abs()
    assert diff.max() <= 1


def test_resized_crop_boxes_follow_scale_and_ratio() -> None:
    top, left, h, w = _resized_crop_boxes(
        4096, 32, 32, (0.5, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0), "cpu"
    )
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    # Rounding the sides to pixels moves area and ratio a little past the bounds.
    assert area.min() > 0.45 and area.max() <= 1.0 and area.std() > 0.1
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5


def test_cutout_blacks_out_one_square() -> None:
    x = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    out = cutout(x, torch.Generator().manual_seed(0), 8)
    holes = out[:, 0] == 0
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 0] == out[:, 2]).all()
    for hole in holes:
        rows, cols = hole.any(1).nonzero()[:, 0], hole.any(0).nonzero()[:, 0]
        # One axis-aligned rectangle of at most 8x8, clipped at the border.
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert hole.sum() == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows)
    assert (holes.sum((1, 2)) == 64).float().mean() > 0.4  # most holes lie fully inside


def test_per_image_policies_leave_the_global_rng_alone() -> None:
    aug = _set(CONF_DIR / "augment" / "trivialaugment.yaml")
    state = torch.get_rng_state()
    aug(_batch(), torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_preview_grid_shows_originals_then_draws() -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    aug = _set(CONF_DIR / "augment" / "standard.yaml")
    grid = preview_grid(images, aug, torch.Generator().manual_seed(0), draws=2, zoom=1)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 + 3 * 34, 2 + 3 * 34)
    for row in range(3):
        y = 2 + row * 34
        assert torch.equal(grid[:, y : y + 32, 2:34], images[row])  # first column: original
    zoomed = preview_grid(images, None, torch.Generator(), draws=2, zoom=4)
    assert zoomed.shape == (3, 4 * (2 + 3 * 34), 4 * (2 + 3 * 34))


def test_preview_png_holds_the_grid_exactly() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    aug = _set(CONF_DIR / "augment" / "cutout.yaml")
    png = preview_png(images, aug, torch.Generator().manual_seed(0), draws=2)
    grid = preview_grid(images, aug, torch.Generator().manual_seed(0), draws=2)
    pixels = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    assert torch.equal(
        torch.from_numpy((pixels * 255).round()).to(torch.uint8), grid.permute(1, 2, 0)
    )


@pytest.mark.parametrize("path", AUGMENT_FILES, ids=[p.stem for p in AUGMENT_FILES])
def test_every_set_trains_end_to_end(tmp_path: Path, path: Path) -> None:
    cfg = compose_cfg([*TINY, "data.subset=4", f"augment={path.stem}", "augment.normalize=dataset"])
    results = run(cfg, tmp_path)
    assert results["status"] == "completed" and results["augment"] == path.stem
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("cifar", CIFAR10_MEAN, CIFAR10_STD),
        ("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_fixed_normalizations(name: str, mean: tuple, std: tuple) -> None:
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert normalization(name, images) == (mean, std)


def test_dataset_normalization_is_the_training_split_statistics() -> None:
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    mean, std = normalization("dataset", images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist())
    assert std == pytest.approx(x.std((0, 2, 3)).tolist())
    with pytest.raises(UserError, match="allowed: cifar, half, dataset, imagenet"):
        normalization("imagenette", images)
