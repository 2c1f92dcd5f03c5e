"""Max pools over few channels compute in fp32 under CPU bf16 autocast (cifar_run.fp32_pool),
to the bits of the bf16 pool, and the swap changes nothing else about a model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cifar_run import accel
from cifar_run.conv_grad import use_tap_weight_grads
from cifar_run.fp32_linear import use_fp32_linears
from cifar_run.fp32_pool import FP32_BELOW, Fp32MaxPool2d, use_fp32_pools
from cifar_run.models.lenet import LeNet5

CPU = torch.device("cpu")
BF16 = accel.Precision("bf16", torch.bfloat16)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Outputs, loss and gradients of one bf16 autocast step (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    return out.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_lenet5_under_bf16_autocast_gives_the_same_bits_with_its_pools_in_fp32() -> None:
    torch.manual_seed(0)
    plain = LeNet5()
    # As cifar-run trains it on the CPU: conv_grad's convolutions, small linears in fp32.
    use_tap_weight_grads(plain)
    use_fp32_linears(plain)
    fast = copy.deepcopy(plain)
    assert use_fp32_pools(fast) == 2
    g = torch.Generator().manual_seed(1)
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(32, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
        # bf16 ties: many equal values in a window, where the first one must win in both.
        x[:4] = x[:4].round()
        y = torch.randint(0, 10, (32,), generator=g)
        out, loss, grads = _step(plain, x, y)
        out2, loss2, grads2 = _step(fast, x, y)
        assert torch.equal(out, out2) and torch.equal(loss, loss2)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


def test_only_narrow_bf16_input_on_the_cpu_is_pooled_in_fp32() -> None:
    pool = nn.MaxPool2d(2)
    use_fp32_pools(pool)
    assert type(pool) is Fp32MaxPool2d
    narrow = torch.randn(2, FP32_BELOW - 1, 8, 8)
    wide = torch.randn(2, FP32_BELOW, 8, 8)
    assert pool(narrow.bfloat16()).dtype == torch.float32
    assert torch.equal(pool(narrow.bfloat16()), F.max_pool2d(narrow.bfloat16(), 2).float())
    assert pool(wide.bfloat16()).dtype == torch.bfloat16
    assert pool(narrow).dtype == torch.float32  # fp32 input: the plain pool
    assert torch.equal(pool(narrow), F.max_pool2d(narrow, 2))


def test_pools_whose_windows_overlap_or_return_indices_stay_plain() -> None:
    net = nn.Sequential(
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2),  # overlapping windows: gradients add up, not exact
        nn.MaxPool2d(2, dilation=2),
        nn.MaxPool2d(2, return_indices=True),
        nn.MaxPool2d((2, 3), stride=(2, 3)),
    )
    assert use_fp32_pools(net) == 2
    assert [type(m) is Fp32MaxPool2d for m in net] == [True, False, False, False, True]
    assert use_fp32_pools(net) == 0  # already swapped


def test_speed_setup_swaps_the_pools_only_for_cpu_bf16() -> None:
    for precision, swapped in (("bf16", 2), ("fp32", 0)):
        model = LeNet5()
        accel.speed_setup(model, CPU, precision, split=False, op_threads=False)
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
        assert sum(type(m) is Fp32MaxPool2d for m in pools) == swapped
    assert accel.fp32_narrow_pools(LeNet5(), torch.device("cuda"), BF16) == 0
    model = LeNet5()
    accel.speed_setup(model, CPU, "bf16", split=False, op_threads=False, fp32_pools=False)
    assert not any(type(m) is Fp32MaxPool2d for m in model.modules())
