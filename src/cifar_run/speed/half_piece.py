"""One piece of a batch split in halves: its forward and backward, and a pruned model's
masked weights taken once per step (cifar_run.speed.halves, shared with the helper
process of cifar_run.speed.halves_process)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from cifar_run.speed.halves_modules import Half, set_half

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def add_grad(p: torch.Tensor, g: torch.Tensor | None, copy: bool = False) -> None:
    if g is None:
        return
    if p.grad is None:
        p.grad = g.clone() if copy else g
    else:
        p.grad.add_(g)


class MaskedWeights:
    """A pruned model's masked weights for one split step. Inside the `with`, torch's
    pruning hooks are held off and each pruned tensor is `orig * mask` as a leaf of its own,
    computed once, which both halves use; `to_unpruned` then passes the leaf's gradient to
    `orig` through the mask (the gradient of `orig * mask` with respect to `orig` is
    `mask`). Nothing happens for a model that is not pruned."""

    def __init__(self, model: nn.Module) -> None:
        self._hooks: list[tuple[nn.Module, dict]] = []  # each pruned module's pre-hooks
        # (module, tensor name, orig, leaf) for each pruned tensor
        self._tensors: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]] = []
        for module in model.modules():
            if not module._forward_pre_hooks:  # most modules: looked at every step
                continue
            methods = [
                h
                for h in module._forward_pre_hooks.values()
                if isinstance(h, prune.BasePruningMethod)
            ]
            if not methods:
                continue
            self._hooks.append((module, dict(module._forward_pre_hooks)))
            for method in methods:
                orig = getattr(module, method._tensor_name + "_orig")
                with torch.no_grad():
                    leaf = method.apply_mask(module)
                leaf.requires_grad_(orig.requires_grad)
                self._tensors.append((module, method._tensor_name, orig, leaf))
        self._leaves = {id(orig): leaf for _, _, orig, leaf in self._tensors}

    def masks(self) -> tuple:
        """Where each pruned tensor's mask is, and its name."""
        return tuple(
            (name, getattr(module, name + "_mask").data_ptr())
            for module, name, _, _ in self._tensors
        )

    def leaf(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor whose gradient the halves take in place of parameter `p`."""
        return self._leaves.get(id(p), p)

    def __enter__(self) -> None:
        for module, hooks in self._hooks:
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(
                (k, h) for k, h in hooks.items() if not isinstance(h, prune.BasePruningMethod)
            )
        for module, name, _, leaf in self._tensors:
            setattr(module, name, leaf)

    def __exit__(self, *exc: object) -> None:
        for module, hooks in self._hooks:
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)  # in their order
        for module, name, _, leaf in self._tensors:
            # A leaf without the step's gradient, as pruning.detach_masked_weights leaves it.
            setattr(module, name, leaf.detach())

    def to_unpruned(self) -> None:
        """Add each leaf's gradient, times the mask, to its `orig`'s."""
        for module, name, orig, leaf in self._tensors:
            if leaf.grad is not None:
                add_grad(orig, leaf.grad * getattr(module, name + "_mask"))


def piece(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    share: float,
    autocast: torch.dtype | None,
    params: list[torch.Tensor] | None,
    half: Half | None,
) -> tuple:
    """Loss of one slice of the batch, weighted by its share; its gradients go into `.grad`
    (params None) or are returned for `params`. `half`: which half this is, what it swaps
    with the other and its generator; None for a batch run whole."""
    set_half(half)
    try:
        # autocast is per thread: the helper enters it itself.
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
            loss = criterion(out, y) * share
        if params is None:
            loss.backward()
            return loss.detach(), out.detach()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), out.detach(), grads
    except BaseException:
        if half is not None:
            half.swap.abort()  # the other half may be waiting for this one at a BatchNorm
        raise
    finally:
        set_half(None)
