"""mixup and CutMix: the blends, their labels, the loader's stream, runs and resume."""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib.image
import pytest
import torch

from cifar_run.config import compare
from cifar_run.data.loader import DeviceLoader
from cifar_run.data.mix import Mix, build_mix, preview_grid
from cifar_run.data.sources import ArraySplit
from cifar_run.engine import checkpoint
from cifar_run.engine.loop import train_one_epoch
from cifar_run.errors import UserError
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run

from .conftest import TINY, compose_cfg, read_results, run_cli
from .test_resume import crash_then_resume

CPU = torch.device("cpu")


def _batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 32, 32, generator=g), torch.arange(b) % 10


def _lam(seed: int, alpha: float) -> float:
    rng = random.Random(seed)
    rng.random()  # the draw that decides whether the batch is mixed
    return rng.betavariate(alpha, alpha)


def test_mixup_blends_each_image_with_its_mirror_by_one_weight() -> None:
    x, y = _batch()
    mixed, target = Mix("mixup", 0.4, 1.0, 10)(x, y, random.Random(3))
    lam = _lam(3, 0.4)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert target.shape == (6, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    for i in range(6):
        expect = torch.zeros(10)
        expect[y[i]] += lam
        expect[y[5 - i]] += 1 - lam
        torch.testing.assert_close(target[i], expect)


def test_cutmix_labels_weigh_the_pasted_area() -> None:
    x, y = _batch()
    for seed in range(20):
        mixed, target = Mix("cutmix", 1.0, 1.0, 10)(x, y, random.Random(seed))
        from_partner = (mixed != x) & (mixed == x.flip(0))
        # One box, the same in every image and channel.
        box = from_partner[0, 0]
        assert torch.equal(from_partner, box.expand_as(from_partner))
        share = box.float().mean().item()
        torch.testing.assert_close(target[0, y[0]].item(), 1 - share)
        torch.testing.assert_close(target[0, y[5]].item(), share)
        if box.any():
            rows, cols = box.nonzero().unbind(1)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert box.sum() == h * w  # a rectangle
    assert torch.equal(x, _batch()[0])  # the caller's batch is left as it was


@pytest.mark.parametrize(("switch_prob", "pasted"), [(0.0, False), (1.0, True)])
def test_mixup_cutmix_switches_between_the_two(switch_prob: float, pasted: bool) -> None:
    x, y = _batch()
    mix = Mix("mixup_cutmix", 1.0, 1.0, 10, cutmix_alpha=1.0, switch_prob=switch_prob)
    kinds = set()
    for seed in range(10):
        mixed, target = mix(x, y, random.Random(seed))
        from_either = ((mixed == x) | (mixed == x.flip(0))).all()
        kinds.add(bool(from_either))
        torch.testing.assert_close(target.sum(1), torch.ones(6))
    assert kinds == {pasted}  # CutMix copies pixels; mixup blends every one
    cfg = compose_cfg([*TINY, "mix=mixup_cutmix", "mix.switch_prob=0.25"]).mix
    assert build_mix(cfg, 10) == Mix("mixup_cutmix", 0.8, 1.0, 10, 1.0, 0.25)


def test_prob_zero_leaves_batches_alone_with_one_hot_labels() -> None:
    x, y = _batch()
    mixed, target = Mix("mixup", 1.0, 0.0, 10)(x, y, random.Random(0))
    assert torch.equal(mixed, x)
    assert torch.equal(target, torch.nn.functional.one_hot(y, 10).float())


def test_build_mix_is_none_for_none_and_for_configs_older_than_the_group() -> None:
    assert build_mix(None, 10) is None
    assert build_mix(compose_cfg(TINY).mix, 10) is None
    mix = build_mix(compose_cfg([*TINY, "mix=cutmix", "mix.alpha=0.5"]).mix, 10)
    assert mix == Mix("cutmix", 0.5, 1.0, 10)


def test_loader_mixes_reproducibly_and_trains_on_soft_labels() -> None:
    g = torch.Generator().manual_seed(1)
    split = ArraySplit(
        torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.arange(40) % 10,
    )

    def loader(seed: int) -> DeviceLoader:
        return DeviceLoader(
            split,
            16,
            device=CPU,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            shuffle=True,
            seed=seed,
            mix=Mix("mixup", 1.0, 1.0, 10),
        )

    first = list(loader(0))
    assert [tuple(y.shape) for _, y in first] == [(16, 10), (16, 10), (8, 10)]
    again = list(loader(0))
    other = list(loader(1))
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][1], other[0][1])
    # A second epoch draws new weights from the mix generator.
    a = loader(0)
    epoch1, epoch2 = list(a), list(a)
    assert not torch.equal(epoch1[0][1], epoch2[0][1])

    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(
        model, first, optimizer, torch.nn.CrossEntropyLoss(), device=CPU, check_every=1
    )
    assert stats.images == 40 and 0 <= stats.acc <= 100 and stats.loss > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mix=mixup", "mix.alpha=0"], "mix.alpha=0: must be a number > 0"),
        (["mix=cutmix", "mix.prob=1.5"], "mix.prob=1.5: must be a probability in [0, 1]"),
        (["mix=cutmix", "mix.name=blend"], "mix.name=blend: unknown; allowed: none, mixup"),
        (["mix=mixup_cutmix", "mix.switch_prob=2"], "mix.switch_prob=2: must be a probability"),
        (["mix=mixup_cutmix", "mix.cutmix_alpha=0"], "mix.cutmix_alpha=0: must be a number > 0"),
    ],
)
def test_bad_mix_values_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as info:
        run(compose_cfg([*TINY, *overrides]), None)
    assert str(info.value).startswith(message)


def test_configs_from_before_the_mix_group_resume_unless_mixing_is_chosen() -> None:
    snapshot = compare.config_snapshot(compose_cfg(TINY))
    before = {k: v for k, v in snapshot.items() if not k.startswith("mix.")}
    assert compare.config_diff(before, compose_cfg(TINY)) == []
    assert compare.config_diff(before, compose_cfg([*TINY, "mix=mixup"])) == [
        "mix.alpha: <absent> -> 0.2",
        "mix.name: <absent> -> mixup",
        "mix.prob: <absent> -> 1.0",
    ]


def test_mixed_run_resumes_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 90 training images, 3 steps per epoch; the crash comes at epoch 2's second step, so the
    # resumed epoch 2 must draw the mix generator's stream from the checkpoint.
    args = [*TINY, "epochs=2", "mix=cutmix", "augment=standard", "deterministic=true"]
    crashed, _ = crash_then_resume(args, tmp_path, monkeypatch, at=5)
    state = checkpoint.load(checkpoint.state_path(crashed))
    assert "mix" in state.data["rng"]["generators"] and read_results(crashed)["mix"] == "cutmix"
    dry = run_cli(*args, "dry_run=true", cwd=tmp_path)
    assert "mix cutmix (alpha 1, prob 1)" in dry.stdout


def test_preview_grid_rows_are_image_partner_then_mixes_of_the_two() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    grid = preview_grid(images, Mix("cutmix", 1.0, 0.0, 1), random.Random(0), draws=3, zoom=1)
    assert grid.shape == (3, 2 + 4 * 34, 2 + 5 * 34)
    for i in range(4):
        cells = [grid[:, 2 + 34 * i : 34 * (i + 1), 2 + 34 * j : 34 * (j + 1)] for j in range(5)]
        a, b = images[i], images[3 - i]
        assert torch.equal(cells[0], a) and torch.equal(cells[1], b)
        for mixed in cells[2:]:  # every pixel from one of the two
            assert ((mixed == a) | (mixed == b)).all()
        # mixed although the Mix says prob 0: the preview always mixes
        assert any(not torch.equal(mixed, a) for mixed in cells[2:])


def test_preview_with_mixing_writes_mix_preview_png(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "mix=mixup", "preview=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(run_dir / "mix_preview.png") in proc.stdout
    grid = matplotlib.image.imread(run_dir / "mix_preview.png")
    # 8 rows of image, partner and 3 mixes, 32 pixels plus 2 of padding each, zoomed 4x.
    assert grid.shape[:2] == (4 * (2 + 8 * 34), 4 * (2 + 5 * 34))
    assert not (run_dir / "results.json").exists()
