from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, RandomSampler

from cifar_run.data import ArraySplit
from cifar_run.loader import DeviceLoader


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
