"""Small linear layers leave CPU autocast for fp32 (cifar_run.fp32_linear), and the swap
changes nothing else about a model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from cifar_run import accel
from cifar_run.fp32_linear import MAX_FP32_MACS, Fp32Linear, use_fp32_linears
from cifar_run.models.lenet import LeNet5

CPU = torch.device("cpu")
BF16 = accel.Precision("bf16", torch.bfloat16)
FP32 = accel.Precision("fp32", None)


def test_every_plain_linear_layer_is_swapped_and_keeps_its_state() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 120), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(4, 2))
    before = copy.deepcopy(net.state_dict())
    assert use_fp32_linears(net) == 3
    assert [type(m) for m in net] == [Fp32Linear, nn.ReLU, Fp32Linear, Fp32Linear]
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert use_fp32_linears(net) == 0  # already swapped: nothing to do twice


def test_calls_above_the_size_limit_keep_autocasts_bf16() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1024)
    use_fp32_linears(layer)
    small_rows = MAX_FP32_MACS // (1024 * 1024)  # the most rows that stay in fp32
    assert small_rows >= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = layer(torch.randn(small_rows, 1024))
        large = layer(torch.randn(small_rows + 1, 1024))
        batched = layer(torch.randn(2, small_rows, 1024))  # rows count every leading dim
    assert small.dtype == torch.float32
    assert large.dtype == torch.bfloat16
    assert batched.dtype == torch.bfloat16


def test_under_cpu_autocast_the_layer_computes_in_fp32_from_the_cast_up_input() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(400, 120)
    fast = copy.deepcopy(layer)
    use_fp32_linears(fast)
    x = torch.randn(8, 400).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        plain = layer(x)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.float(), layer.weight, layer.bias))
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16  # the cast's backward hands back the input's dtype
    assert fast.weight.grad.dtype == torch.float32
    expected = torch.ones(8, 120).t() @ x.float()
    torch.testing.assert_close(fast.weight.grad, expected)


def test_without_autocast_the_layer_is_a_plain_linear() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    fast = copy.deepcopy(layer)
    use_fp32_linears(fast)
    x = torch.randn(3, 16)
    assert torch.equal(fast(x), layer(x))
    # A bf16 model outside autocast stays in bf16: only autocast's choice is overridden.
    x16 = x.to(torch.bfloat16)
    out16 = fast.to(torch.bfloat16)(x16)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, layer.to(torch.bfloat16)(x16))


def test_global_pruning_reaches_the_fp32_route() -> None:
    torch.manual_seed(0)
    net = LeNet5()
    use_fp32_linears(net)
    layer = net.classifier[1]
    assert isinstance(layer, Fp32Linear)
    prune.global_unstructured([(layer, "weight")], prune.L1Unstructured, amount=0.5)
    x = torch.randn(4, 400)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = F.linear(x, layer.weight_orig * layer.weight_mask, layer.bias)
    assert torch.equal(out, expected)
    out.sum().backward()
    masked = layer.weight_mask == 0
    assert torch.all(layer.weight_orig.grad[masked] == 0)
    assert torch.any(layer.weight_orig.grad[~masked] != 0)


def test_the_swap_is_for_cpu_autocast_only() -> None:
    net = nn.Sequential(nn.Linear(8, 4))
    assert accel.fp32_small_linears(net, torch.device("cuda"), BF16) == 0
    assert accel.fp32_small_linears(net, CPU, FP32) == 0
    assert type(net[0]) is nn.Linear
    assert accel.fp32_small_linears(net, CPU, BF16) == 1
    assert type(net[0]) is Fp32Linear


def test_speed_setup_swaps_for_bf16_on_the_cpu_and_can_be_told_not_to() -> None:
    for fp32_linears, expected in ((True, Fp32Linear), (False, nn.Linear)):
        net = LeNet5()
        accel.speed_setup(net, CPU, "bf16", split=False, fp32_linears=fp32_linears)
        assert {type(m) for m in net.classifier if isinstance(m, nn.Linear)} == {expected}
    net = LeNet5()
    accel.speed_setup(net, CPU, "fp32", split=False)
    assert {type(m) for m in net.classifier if isinstance(m, nn.Linear)} == {nn.Linear}


def test_compiled_model_keeps_the_fp32_route_and_trains() -> None:
    torch.manual_seed(0)
    eager = LeNet5()
    use_fp32_linears(eager)
    net = copy.deepcopy(eager)
    speed = accel.speed_setup(net, CPU, "bf16", compile=True)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = speed.net(x)
        expected = eager(x)
    assert out.dtype == torch.float32  # the head left autocast inside the compiled graph
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    F.cross_entropy(out, y).backward()
    grad = net.classifier[1].weight.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)
