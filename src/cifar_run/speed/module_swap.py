"""Giving a model's modules a subclass's behaviour in place, by changing their class.

The speed settings swap plain torch modules for subclasses that only override how they
compute (conv_grad's TapConv2d): the module object, its parameters, buffers, hooks and
state-dict keys stay, so optimizers, pruning and checkpoints that hold the model see no
change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn


def swap_classes(
    model: nn.Module,
    classes: Mapping[type, type],
    where: Callable[[nn.Module], bool] | None = None,
) -> int:
    """Change the class of every module of `model` whose exact type is a key of `classes`
    (subclasses of the key are left alone), and for which `where` holds if given, to its
    value. Returns how many changed."""
    changed = 0
    for module in model.modules():
        new = classes.get(type(module))
        if new is not None and (where is None or where(module)):
            module.__class__ = new
            changed += 1
    return changed
