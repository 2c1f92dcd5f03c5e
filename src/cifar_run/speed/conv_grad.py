"""Convolutions on small feature maps, on the CPU, written as matrix multiplies.

On the CPU, oneDNN's convolution kernels are slow when the feature map is small and the
channels many: for ResNet-18's 4x4 layers (512 channels, batch 128, bf16) the weight
gradient runs far below the machine's matrix-multiply rate and takes a large share of the
whole training step, forward and input gradient somewhat less so. As matrix multiplies they
take a fraction of that time (docs/speed.md):

- maps up to `MAX_TAP_PIXELS` output pixels (8x8): the weight gradient is one multiply per
  kernel tap (for tap (i, j): the output gradient as an (N*Ho*Wo, O) matrix times the input
  shifted by (i, j) as an (N*Ho*Wo, C) matrix); forward and input gradient stay oneDNN's,
  which is faster there;
- maps up to `MAX_GEMM_PIXELS` output pixels (4x4): the whole convolution is one multiply
  with the unfolded input (im2col, N*Ho*Wo rows of kh*kw*C), and its gradients two more,
  the input gradient folded back tap by tap in fp32.

`TapConv2d` is an `nn.Conv2d` with the same parameters and state dict; it takes these
routes only where they pay off (CPU, bf16, at least `MIN_TAP_CHANNELS` input x output
channels) and is a plain Conv2d elsewhere: on CUDA, in fp32 (where they gain nothing),
without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_run.speed.module_swap import swap_classes

MAX_TAP_PIXELS = 64  # output maps up to 8x8: weight gradient by taps
MAX_GEMM_PIXELS = 16  # output maps up to 4x4: the whole convolution as matrix multiplies
MIN_TAP_CHANNELS = 128 * 128  # in_channels * out_channels; oneDNN is faster for 64 x 64 at 8x8


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _tap(start: int, count: int, stride: int) -> slice:
    """The `count` input positions that kernel offset `start` meets along one axis."""
    return slice(start, start + stride * (count - 1) + 1, stride)


def _padded_nhwc(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """x zero-padded, as an NHWC view (free for channels_last tensors)."""
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)


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
    (kh, kw), (sh, sw) = kernel, stride
    xp = _padded_nhwc(x, padding)  # a view: the per-tap slices below copy anyway
    g = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, o).t()
    out = torch.empty(o, kh, kw, c, dtype=grad_out.dtype, device=grad_out.device)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, _tap(i, ho, sh), _tap(j, wo, sw), :]
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


def _unfold(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """im2col: (N*Ho*Wo, kh*kw*C), each row one output pixel's receptive field in (i, j, c)
    order, built by one strided copy of the padded NHWC input."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = _padded_nhwc(x, padding).contiguous()
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    windows = xp.as_strided(
        (n, ho, wo, kh, kw, c), (hp * wp * c, sh * wp * c, sw * c, wp * c, c, 1)
    )
    return windows.reshape(n * ho * wo, kh * kw * c)


class _GemmConv(torch.autograd.Function):
    """conv2d without bias as one matrix multiply with the unfolded input."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):  # noqa: ANN001, ANN205 (autograd API)
        n, _, h, w = x.shape
        o, c, kh, kw = weight.shape
        (sh, sw), (ph, pw) = stride, padding
        ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
        cols = _unfold(x, (kh, kw), stride, padding)
        wmat = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)  # (O, kh*kw*C), like cols
        ctx.save_for_backward(cols, wmat)
        ctx.geometry = (x.shape, (kh, kw), stride, padding)
        # (N*Ho*Wo, O) is NHWC: the result is a channels_last tensor, as oneDNN's would be.
        return (cols @ wmat.t()).view(n, ho, wo, o).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        cols, wmat = ctx.saved_tensors
        (n, c, h, w), (kh, kw), (sh, sw), (ph, pw) = ctx.geometry
        o = wmat.shape[0]
        ho, wo = grad_out.shape[2:]
        g = grad_out.to(cols.dtype).permute(0, 2, 3, 1).reshape(n * ho * wo, o)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gcols = (g @ wmat).view(n, ho, wo, kh, kw, c)
            # Fold back: each tap adds into the padded input's gradient, summed in fp32.
            acc = torch.zeros(n, h + 2 * ph, w + 2 * pw, c, device=g.device)
            for i in range(kh):
                for j in range(kw):
                    acc[:, _tap(i, ho, sh), _tap(j, wo, sw), :] += gcols[:, :, :, i, j, :]
            grad_x = acc[:, ph : ph + h, pw : pw + w, :].to(g.dtype).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ cols).view(o, kh, kw, c).permute(0, 3, 1, 2).to(wmat.dtype)
        return grad_x, grad_w, None, None


class TapConv2d(nn.Conv2d):
    """nn.Conv2d that runs as matrix multiplies on small CPU feature maps (module doc)."""

    def _route(self, x: torch.Tensor, weight: torch.Tensor) -> type | None:
        """_GemmConv, _TapConv, or None for oneDNN's convolution."""
        if x.device.type != "cpu" or x.dim() != 4 or not torch.is_grad_enabled():
            return None
        if _compute_dtype(x) != torch.bfloat16:
            return None
        if not weight.requires_grad or self.bias is not None or self.groups != 1:
            return None
        if self.dilation != (1, 1) or self.padding_mode != "zeros":
            return None
        if not isinstance(self.padding, tuple):  # "same" / "valid" strings
            return None
        if self.in_channels * self.out_channels < MIN_TAP_CHANNELS:
            return None
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
        if ho * wo <= MAX_GEMM_PIXELS:
            return _GemmConv
        return _TapConv if ho * wo <= MAX_TAP_PIXELS else None

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        route = self._route(input, weight)
        if route is None:
            return super()._conv_forward(input, weight, bias)
        # A custom Function sees its inputs as given: cast them as autocast would cast the
        # convolution's, so that the backward runs in the same dtype.
        dtype = _compute_dtype(input)
        return route.apply(input.to(dtype), weight.to(dtype), self.stride, self.padding)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of `x` runs in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def use_tap_weight_grads(model: nn.Module) -> int:
    """Turn every plain nn.Conv2d of `model` into a TapConv2d, in place (same parameters,
    buffers and state-dict keys). Returns how many were changed."""
    return swap_classes(model, {nn.Conv2d: TapConv2d})
