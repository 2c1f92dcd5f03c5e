"""What the training loop knows of the speed layer: a step function per epoch.

The loop asks `epoch(model, autocast, scaler)` for a context that yields a
`ForwardBackward`, and calls it once per batch. `PlainSteps` is the whole story without
tricks: autocast, loss, backward. The speed layer (cifar_run.speed.setup) hands the loop
something with the same method that may run the batch differently (for example split in
pieces, or captured as a graph), always leaving the same gradients in `.grad` and returning
the same loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (criterion, x, y) -> (loss, outputs): forward, loss and backward of one batch, gradients
# added to the parameters' `.grad`.
Tensors = tuple[torch.Tensor, torch.Tensor]
ForwardBackward = Callable[[Criterion, torch.Tensor, torch.Tensor], Tensors]


class EpochSteps(Protocol):
    def epoch(
        self,
        model: nn.Module,
        autocast: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> AbstractContextManager[ForwardBackward]: ...


def forward_backward(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain step: `criterion(model(x), y)` under autocast, backward (scaled for fp16)."""
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = model(x)
        loss = criterion(out, y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss, out


class PlainSteps:
    """Every batch whole, on the threads in use: `speed=plain`, and the loop's default."""

    @contextmanager
    def epoch(
        self,
        model: nn.Module,
        autocast: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> Iterator[ForwardBackward]:
        def step(criterion: Criterion, x: torch.Tensor, y: torch.Tensor) -> tuple:
            return forward_backward(model, criterion, x, y, autocast, scaler)

        yield step


PLAIN = PlainSteps()
