"""2x2 max pooling on the CPU from three elementwise maximums.

On the CPU, aten's max pooling of NCHW tensors is a scalar loop per output: for LeNet-5's
first pool (a 64x6x28x28 batch) it took 1.3 ms, a sixth of the whole training step, while
three `torch.maximum`s over the four strided quarters of the same batch take 0.25 ms
(docs/benchmarks.md, "2x2 max pooling"). Its backward, a scatter by saved indices, is fast,
so `_Pool2x2` keeps it: the forward also works out the index aten would have saved (the
first maximum in row-major order, as aten's `val > max` scan picks it), so outputs and
gradients are aten's exactly, ties included.

`MaxPool2x2` is an `nn.MaxPool2d` that takes this route only where it was measured faster
(CPU, NCHW, kernel 2, stride 2, no padding or dilation); channels_last batches keep aten's
kernel, which is vectorised over channels there.
"""

from __future__ import annotations

import torch
from torch import nn


def _plane_offsets(ho: int, wo: int, w: int, device: torch.device) -> torch.Tensor:
    """Flat index (row * w + column) of each 2x2 window's top-left pixel, (ho, wo) int64."""
    rows = torch.arange(ho, device=device).mul_(2 * w).view(ho, 1)
    return rows + torch.arange(wo, device=device).mul_(2).view(1, wo)


class _Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ho, wo = x.shape[2] // 2, x.shape[3] // 2
        even = x[:, :, : 2 * ho, : 2 * wo]  # floor mode: an odd last row or column is dropped
        a, b = even[:, :, 0::2, 0::2], even[:, :, 0::2, 1::2]
        c, d = even[:, :, 1::2, 0::2], even[:, :, 1::2, 1::2]
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        y = torch.maximum(top, bottom)
        if ctx.needs_input_grad[0]:
            w = x.shape[3]
            lower = bottom > top  # ties go to the top row, as in aten's scan
            right = (lower & (d > c)) | (~lower & (b > a))
            # Built in uint8 (offsets up to w + 1), widened once: int64 arithmetic on the
            # whole batch cost more than the pooling itself.
            offset = lower.to(torch.uint8).mul_(w).add_(right)
            index = offset.to(torch.int64).add_(_plane_offsets(ho, wo, w, x.device))
            ctx.save_for_backward(x, index)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor]:  # noqa: ANN001
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, [2, 2], [2, 2], [0, 0], [1, 1], False, index
        )


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d that pools 2x2 windows by elementwise maximums on the CPU (module doc)."""

    def _fast(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.is_contiguous()  # NCHW; channels_last is aten's fast case
            and x.shape[2] >= 2
            and x.shape[3] >= 2
            and not self.return_indices
            and not self.ceil_mode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast(x):
            return _Pool2x2.apply(x)
        return super().forward(x)


def _is_2x2(pool: nn.MaxPool2d) -> bool:
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return (v, v) if isinstance(v, int) else tuple(v)

    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (
        pair(pool.kernel_size) == (2, 2)
        and pair(stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
    )


def use_pool2x2(model: nn.Module) -> int:
    """Turn every plain 2x2, stride-2 nn.MaxPool2d of `model` into a MaxPool2x2, in place (it
    has no parameters or buffers, so state dicts are unchanged). Returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.MaxPool2d and _is_2x2(module):
            module.__class__ = MaxPool2x2
            changed += 1
    return changed
