"""Weight gradients of convolutions on small feature maps, computed as matrix multiplies.

On the CPU, oneDNN's weight-gradient kernel is slow when the feature map is small and the
channels many: for ResNet-18's 4x4 layers (512 channels, batch 128, bf16) it ran at about
90 GFLOP/s, a seventh of the same machine's matrix-multiply rate, and took a third of the
whole training step (docs/benchmarks.md, "Speed settings"). Written as one matrix multiply
per kernel tap (the gradient for tap (i, j) is the output gradient, as an (N*Ho*Wo, O)
matrix, times the input shifted by (i, j), as an (N*Ho*Wo, C) matrix), the same gradient
takes a fifth of the time there. The forward pass and the input gradient stay oneDNN's.

`TapConv2d` is an `nn.Conv2d` with the same parameters and state dict; it takes the matmul
route only where that was measured faster (CPU, bf16, output map of at most
`MAX_TAP_PIXELS` pixels, at least `MIN_TAP_CHANNELS` input x output channels) and is a
plain Conv2d elsewhere: on CUDA, in fp32 (where the two were even), without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_TAP_PIXELS = 64  # output maps up to 8x8
MIN_TAP_CHANNELS = 128 * 128  # in_channels * out_channels; 64 x 64 at 8x8 was faster in oneDNN


def tap_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """d loss / d weight of `conv2d(x, weight, stride, padding)` (no dilation, one group),
    given d loss / d output: one (O x N*Ho*Wo) @ (N*Ho*Wo x C) multiply per kernel tap.
    Returns an (O, C, kh, kw) tensor in channels_last strides."""
    n, o, ho, wo = grad_out.shape
    c = x.shape[1]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    # NHWC views: free for channels_last tensors, and the per-tap slices below copy anyway.
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    g = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, o).t()
    out = torch.empty(o, kh, kw, c, dtype=grad_out.dtype, device=grad_out.device)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
            torch.mm(g, tap.reshape(n * ho * wo, c), out=out[:, i, j, :])
    return out.permute(0, 3, 1, 2)


class _TapConv(torch.autograd.Function):
    """conv2d without bias whose backward computes the weight gradient by taps."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):  # noqa: ANN001, ANN205 (autograd API)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                None,
                list(ctx.stride),
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = tap_weight_grad(
                grad_out, x, tuple(weight.shape[2:]), ctx.stride, ctx.padding
            ).to(weight.dtype)
        return grad_x, grad_w, None, None


class TapConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient on small CPU feature maps is computed by taps."""

    def _taps_pay(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dim() != 4 or not torch.is_grad_enabled():
            return False
        if _compute_dtype(x) != torch.bfloat16:
            return False
        if not weight.requires_grad or self.bias is not None or self.groups != 1:
            return False
        if self.dilation != (1, 1) or self.padding_mode != "zeros":
            return False
        if not isinstance(self.padding, tuple):  # "same" / "valid" strings
            return False
        if self.in_channels * self.out_channels < MIN_TAP_CHANNELS:
            return False
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho = (x.shape[2] + 2 * ph - kh) // sh + 1
        wo = (x.shape[3] + 2 * pw - kw) // sw + 1
        return ho * wo <= MAX_TAP_PIXELS

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if not self._taps_pay(input, weight):
            return super()._conv_forward(input, weight, bias)
        # A custom Function sees its inputs as given: cast them as autocast would cast the
        # convolution's, so that the backward runs in the same dtype.
        dtype = _compute_dtype(input)
        return _TapConv.apply(input.to(dtype), weight.to(dtype), self.stride, self.padding)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of `x` runs in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def use_tap_weight_grads(model: nn.Module) -> int:
    """Turn every plain nn.Conv2d of `model` into a TapConv2d, in place (same parameters,
    buffers and state-dict keys). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = TapConv2d
            changed += 1
    return changed
