"""Class swaps (cifar_run.speed.module_swap) change behaviour only: same objects, same state."""

from __future__ import annotations

import torch
from torch import nn

from cifar_run.speed.module_swap import swap_classes


class Twice(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


class Sub(nn.Linear):
    pass


def test_exact_types_are_swapped_in_place_and_subclasses_left_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 3), Sub(3, 3), nn.ReLU())
    first = net[0]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3)
    before = first(x)
    assert swap_classes(net, {nn.Linear: Twice}) == 1
    assert net[0] is first and type(first) is Twice
    assert type(net[1]) is Sub and type(net[2]) is nn.ReLU
    assert torch.equal(first(x), 2 * before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert swap_classes(net, {nn.Linear: Twice}) == 0
