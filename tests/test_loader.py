from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from cifar_run.data.augment import build_augment
from cifar_run.data.loader import DeviceLoader
from cifar_run.data.sources import ArraySplit

from .conftest import compose_cfg


def _split(n: int = 50) -> ArraySplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ArraySplit(images, torch.arange(n) % 10)


def test_order_matches_torch_random_sampler_for_the_same_seed() -> None:
    split = _split()
    loader = DeviceLoader(
        split, 8, device=torch.device("cpu"), mean=(0,) * 3, std=(1,) * 3, shuffle=True, seed=5
    )
    sampler = BatchSampler(
        RandomSampler(range(len(split)), generator=torch.Generator().manual_seed(5)), 8, False
    )
    for _ in range(2):  # two epochs: the generators advance alike
        for (x, y), idx in zip(loader, sampler, strict=True):
            assert torch.equal(y, split.labels[idx])
            assert torch.allclose(x, split.images[idx].float() / 255)


def test_normalization_and_unshuffled_order() -> None:
    split = _split(10)
    loader = DeviceLoader(split, 4, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2] and len(loader) == 3
    x0 = batches[0][0]
    assert torch.allclose(x0, (split.images[:4].float() / 255 - 0.5) / 0.25, atol=1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("augment", ["none", "standard"])
def test_batches_are_the_one_pass_normalization_bit_for_bit(
    fmt: torch.memory_format, augment: str
) -> None:
    # However the batch is gathered (NHWC rows for channels_last without augmentation) and
    # normalized (per value of an image, on the CPU), the values are those of one fused
    # multiply-add over the NCHW batch, to the last bit, in the memory format asked for.
    split = _split(40)
    aug = build_augment(compose_cfg([f"augment={augment}"]).augment)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    loader = DeviceLoader(
        split,
        16,
        device=torch.device("cpu"),
        mean=mean,
        std=std,
        shuffle=True,
        seed=3,
        augment=aug,
        memory_format=fmt,
    )
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    augment_generator = torch.Generator().manual_seed(4)  # the loader's: seed + 1
    scale = (1 / (255 * torch.tensor(std))).view(1, -1, 1, 1)
    shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1)
    for i, (x, y) in enumerate(loader):
        idx = order[16 * i : 16 * (i + 1)]
        raw = split.images[idx]
        if aug is not None:
            raw = aug(raw, augment_generator)
        assert x.is_contiguous(memory_format=fmt) and x.dtype == torch.float32
        assert torch.equal(x, torch.addcmul(shift, raw, scale))
        assert torch.equal(y, split.labels[idx])
