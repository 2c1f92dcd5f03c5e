"""One training epoch and one evaluation pass: no Hydra, no files, no config objects."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochStats:
    loss: float  # mean cross-entropy per image
    acc: float  # percent correct
    images: int
    seconds: float


def _stats(loss_sum: torch.Tensor, correct: torch.Tensor, n: int, t0: float) -> EpochStats:
    # The only host synchronisation of the pass: everything above stays on the device.
    if n == 0:
        return EpochStats(float("nan"), float("nan"), 0, time.perf_counter() - t0)
    return EpochStats(
        loss=loss_sum.item() / n,
        acc=100.0 * correct.item() / n,
        images=n,
        seconds=time.perf_counter() - t0,
    )


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    step_scheduler: Callable[[], None] | None = None,
    desc: str = "train",
) -> EpochStats:
    """Train for one pass over `batches`; `step_scheduler` is called after every step."""
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    total = len(batches) if isinstance(batches, Sized) else None
    for x, y in tqdm(batches, total=total, desc=desc, leave=False, disable=None):
        out = model(x)
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler()
        loss_sum += loss.detach() * y.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        n += y.shape[0]
    return _stats(loss_sum, correct, n, t0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
) -> EpochStats:
    """Mean loss and accuracy of `model` over `batches`, in eval mode."""
    model.eval()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in batches:
        out = model(x)
        loss_sum += criterion(out, y) * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    return _stats(loss_sum, correct, n, t0)
