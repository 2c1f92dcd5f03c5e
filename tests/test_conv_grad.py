"""Weight gradients by taps (cifar_run.speed.conv_grad) equal oneDNN's, and the swap changes
nothing else about a model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from cifar_run.models.resnet import ResNet
from cifar_run.speed import conv_grad
from cifar_run.speed import setup as accel
from cifar_run.speed.conv_grad import TapConv2d, tap_weight_grad, use_tap_weight_grads

SHAPES = [  # in, out, map size, kernel, stride, padding: ResNet-18's small-map layers
    (128, 128, 8, 3, 1, 1),
    (128, 256, 16, 3, 2, 1),
    (256, 512, 8, 3, 2, 1),
    (256, 512, 8, 1, 2, 0),
    (512, 512, 4, 3, 1, 1),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("cin", "cout", "size", "k", "stride", "pad"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tap_weight_grad_equals_the_convolution_backward(
    cin: int, cout: int, size: int, k: int, stride: int, pad: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, cin, size, size, dtype=dtype)
    w = torch.randn(cout, cin, k, k, dtype=dtype)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt)
        g = torch.randn_like(torch.nn.functional.conv2d(xf, w, None, stride, pad))
        want = torch.ops.aten.convolution_backward(
            g, xf, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
        got = tap_weight_grad(g, xf, (k, k), (stride, stride), (pad, pad))
        assert got.shape == want.shape
        # fp32 sums in another order; bf16 rounds the result to 8 bits of mantissa.
        assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def _pair(cin: int, cout: int, k: int, stride: int, pad: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
    taps = copy.deepcopy(plain)
    assert use_tap_weight_grads(taps) == 1
    return plain, taps


@pytest.mark.parametrize(
    ("cin", "cout", "size", "k", "stride", "pad"),
    [
        (3, 8, 9, 3, 1, 1),
        (4, 6, 8, 3, 2, 1),
        (5, 7, 6, 1, 2, 0),
        (4, 4, 5, 5, 1, 2),
        (2, 3, 7, 3, 2, 0),
    ],
)
def test_gemm_convolution_equals_conv2d_with_its_gradients(
    cin: int, cout: int, size: int, k: int, stride: int, pad: int
) -> None:
    """The whole convolution as matrix multiplies, in fp64, any stride/padding/kernel."""
    torch.manual_seed(0)
    x = torch.randn(3, cin, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64, requires_grad=True)
    s, p = (stride, stride), (pad, pad)
    assert torch.autograd.gradcheck(lambda a, b: conv_grad._GemmConv.apply(a, b, s, p), (x, w))
    want = torch.nn.functional.conv2d(x, w, None, s, p)
    got = conv_grad._GemmConv.apply(x, w, s, p)
    torch.testing.assert_close(got, want)


def test_tap_conv_on_8x8_maps_takes_the_tap_route_and_matches_conv2d(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = conv_grad.tap_weight_grad
    monkeypatch.setattr(conv_grad, "tap_weight_grad", lambda *a: calls.append(1) or real(*a))
    plain, taps = _pair(128, 256, 3, 1, 1)
    x = torch.randn(16, 128, 8, 8).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = plain(xa), taps(xb)
    assert yb.dtype == ya.dtype == torch.bfloat16
    assert torch.equal(ya, yb)  # the forward is the same oneDNN convolution
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert calls == [1]
    assert torch.equal(xa.grad, xb.grad)  # so is the input gradient
    assert taps.weight.grad.dtype == torch.float32  # the parameter's own dtype
    assert _rel(taps.weight.grad, plain.weight.grad) < 1e-2


@pytest.mark.parametrize(("cin", "cout", "size", "k", "stride", "pad"), SHAPES[2:])
def test_tap_conv_on_4x4_outputs_runs_as_matmuls_and_matches_conv2d(
    monkeypatch: pytest.MonkeyPatch, cin: int, cout: int, size: int, k: int, stride: int, pad: int
) -> None:
    calls = []
    real = conv_grad._unfold
    monkeypatch.setattr(conv_grad, "_unfold", lambda *a: calls.append(1) or real(*a))
    plain, taps = _pair(cin, cout, k, stride, pad)
    x = torch.randn(16, cin, size, size).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = plain(xa), taps(xb)
    assert calls == [1]
    assert yb.dtype == torch.bfloat16 and yb.shape == ya.shape
    assert yb.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    # bf16 results: oneDNN and the matmuls round at different places.
    assert _rel(yb, ya) < 1e-2
    assert _rel(xb.grad, xa.grad) < 1e-2
    assert _rel(taps.weight.grad, plain.weight.grad) < 1e-2


@pytest.mark.parametrize(
    ("cin", "cout", "size", "autocast", "grad"),
    [
        (256, 256, 8, False, True),  # fp32: the two were even, keep oneDNN's
        (64, 64, 8, True, True),  # few channels: oneDNN was faster
        (256, 256, 16, True, True),  # a 16x16 map: oneDNN was faster
        (256, 256, 8, True, False),  # no gradient wanted (evaluation)
    ],
)
def test_tap_conv_keeps_the_plain_route_where_taps_do_not_pay(
    monkeypatch: pytest.MonkeyPatch, cin: int, cout: int, size: int, autocast: bool, grad: bool
) -> None:
    monkeypatch.setattr(conv_grad, "_TapConv", None)  # any use of the tap route would fail
    plain, taps = _pair(cin, cout, 3, 1, 1)
    x = torch.randn(4, cin, size, size)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        assert torch.equal(taps(x), plain(x))


def test_swapped_resnet_keeps_its_state_dict_and_trains_like_the_plain_one() -> None:
    torch.manual_seed(0)
    plain = ResNet(depths=[1, 1, 1, 1], widths=[64, 128, 256, 512])
    fast = copy.deepcopy(plain)
    changed = accel.tap_conv_grads(fast, torch.device("cpu"))
    assert changed == sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert all(type(m) is not nn.Conv2d for m in fast.modules())
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), fast.state_dict().values(), strict=True)
    )
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = []
    for net in (plain, fast):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


def test_global_pruning_works_on_tap_convolutions() -> None:
    _, taps = _pair(256, 256, 3, 1, 1)
    assert isinstance(taps, TapConv2d) and isinstance(taps, nn.Conv2d)
    prune.global_unstructured([(taps, "weight")], prune.L1Unstructured, amount=0.5)
    x = torch.randn(4, 256, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taps(x).float().sum().backward()
    masked = taps.weight_mask == 0
    assert int(masked.sum()) == taps.weight_mask.numel() // 2
    assert torch.all(taps.weight_orig.grad[masked] == 0)  # the mask reaches the gradient
    assert torch.any(taps.weight_orig.grad[~masked] != 0)


def test_cuda_models_and_compiled_runs_are_left_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert accel.tap_conv_grads(net, torch.device("cuda")) == 0
    assert accel.tap_conv_grads(net, torch.device("cpu"), compile=True) == 0
    assert type(net[0]) is nn.Conv2d
    assert accel.tap_conv_grads(net, torch.device("cpu")) == 1
