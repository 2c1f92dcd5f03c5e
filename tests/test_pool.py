"""2x2 max pools by elementwise maximums (cifar_run.pool) equal aten's, outputs and
gradients, ties included, and the swap changes nothing else about a model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_run import accel
from cifar_run.models.lenet import LeNet5
from cifar_run.pool import MaxPool2x2, use_pool2x2


def _tied(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values on a coarse grid, so that most 2x2 windows hold ties (and ReLU-like zeros)."""
    torch.manual_seed(0)
    return (torch.randn(shape) * 2).round().clamp_min(0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 6, 28, 28), (3, 16, 10, 10), (2, 3, 7, 9), (1, 1, 2, 2)])
def test_outputs_and_gradients_equal_aten(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _tied(shape, dtype)
    pool = MaxPool2x2(2)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = pool(ours)
    want = F.max_pool2d(theirs, 2)
    assert torch.equal(y, want)
    grad = torch.randn_like(want)
    y.backward(grad)
    want.backward(grad)
    # The same index per window: each window's gradient lands on the same one input.
    assert torch.equal(ours.grad, theirs.grad)
    assert int((ours.grad != 0).sum()) == int((grad != 0).sum())
    with torch.no_grad():
        assert torch.equal(pool(x), F.max_pool2d(x, 2))


def test_gradcheck_on_distinct_values() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MaxPool2x2(2), (x,))


def test_channels_last_and_other_layouts_fall_back_to_aten(monkeypatch) -> None:  # noqa: ANN001
    from cifar_run import pool as pool_module

    monkeypatch.setattr(pool_module, "_Pool2x2", None)  # any use of the fast route would fail
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(MaxPool2x2(2)(x), F.max_pool2d(x, 2))
    y = torch.randn(2, 4, 9, 9)
    assert torch.equal(MaxPool2x2(2, ceil_mode=True)(y), F.max_pool2d(y, 2, ceil_mode=True))


def test_swap_takes_only_plain_2x2_stride_2_pools() -> None:
    net = nn.Sequential(
        nn.MaxPool2d(2),
        nn.MaxPool2d((2, 2), stride=2),
        nn.MaxPool2d(3, 2),
        nn.MaxPool2d(2, stride=1),
        nn.MaxPool2d(2, padding=1),
        nn.AvgPool2d(2),
    )
    assert use_pool2x2(net) == 2
    assert [type(m).__name__ for m in net] == [
        "MaxPool2x2",
        "MaxPool2x2",
        "MaxPool2d",
        "MaxPool2d",
        "MaxPool2d",
        "AvgPool2d",
    ]


def test_swapped_lenet_trains_exactly_like_the_plain_one() -> None:
    torch.manual_seed(0)
    plain = LeNet5()
    fast = copy.deepcopy(plain)
    assert accel.pool2x2(fast, torch.device("cpu")) == 2
    assert plain.state_dict().keys() == fast.state_dict().keys()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    losses: dict[str, list[float]] = {}
    for name, net in (("plain", plain), ("fast", fast)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["fast"] == losses["plain"]
    assert losses["fast"][-1] < losses["fast"][0]


def test_cuda_models_and_compiled_runs_are_left_alone() -> None:
    net = nn.Sequential(nn.MaxPool2d(2))
    assert accel.pool2x2(net, torch.device("cuda")) == 0
    assert accel.pool2x2(net, torch.device("cpu"), compile=True) == 0
    assert type(net[0]) is nn.MaxPool2d
    assert accel.pool2x2(net, torch.device("cpu")) == 1
