"""One training epoch and one evaluation pass: no Hydra, no files, no config objects."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from cifar_run.constants import TTA_MODES
from cifar_run.cores import cpu_threads
from cifar_run.split import BatchSplit

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# Steps between looks at the loss for NaN/inf. A look is one host synchronisation; checking
# every step would stall a GPU pipeline each batch. The losses since the last look are kept on
# the device, so the first bad step is still named exactly; up to CHECK_EVERY - 1 further steps
# then run on diverged weights, which are thrown away (nothing of that epoch is saved).
CHECK_EVERY = 50


class NonFiniteLoss(RuntimeError):
    """The training loss was NaN or infinite at `step` (1-based, within the epoch)."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(f"loss is {loss} at step {step} (lr {lr:.4g})")
        self.step, self.loss, self.lr = step, loss, lr


@dataclass
class EpochStats:
    loss: float  # mean cross-entropy per image
    acc: float  # percent correct
    images: int
    seconds: float
    # (classes x classes) image counts, rows the true class, columns the predicted one; only
    # from an evaluate() asked for it (num_classes), on the CPU.
    confusion: torch.Tensor | None = None


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
    check_every: int = CHECK_EVERY,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
    split: BatchSplit | None = None,
) -> EpochStats:
    """Train for one pass over `batches`; `step_scheduler` is called after every step.
    Labels are class indices (B,) or class probabilities (B, classes), e.g. mixup's.

    `autocast`: run the forward pass and loss under `torch.autocast` in that dtype (bf16 or
    fp16; None: fp32). `scaler`: scale the loss for fp16 (a GradScaler skips steps whose
    gradients overflowed; its inf check costs one host synchronisation per step on CUDA).
    `grad_clip`: scale the gradients of all parameters together down to at most this L2
    norm before each step (torch.nn.utils.clip_grad_norm_; with a scaler, of the unscaled
    gradients). `after_step` is called after every optimizer step (e.g. a weight average's
    update). `split`: run each batch's forward and backward as two halves on two threads
    (cifar_run.split; ignored for a model it does not suit and with a scaler).

    Raises NonFiniteLoss naming the first step whose loss was NaN or infinite, at most
    `check_every - 1` steps after it.
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    total = len(batches) if isinstance(batches, Sized) else None
    recent = _RecentLosses(check_every, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Looked at once per epoch: the pruning stage fine-tunes, pruned, a model whose dense
    # epochs ran in halves.
    if split is not None and (scaler is not None or not split.prepare(model)):
        split = None
    # A step with a helper process leaves this thread at its share of the CPU threads for
    # the rest of the epoch (BatchSplit.forward_backward): every thread again after it.
    with cpu_threads(torch.get_num_threads()):
        for x, y in tqdm(batches, total=total, desc=desc, leave=False, disable=None):
            lr = optimizer.param_groups[0]["lr"]  # before a per-step scheduler moves it
            optimizer.zero_grad(set_to_none=True)
            if split is not None:
                loss, out = split.forward_backward(model, criterion, x, y, autocast=autocast)
            else:
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = model(x)
                    loss = criterion(out, y)
                (loss if scaler is None else scaler.scale(loss)).backward()
            if grad_clip is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip what the step will apply, not the scaled
                nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            if after_step is not None:
                after_step()
            if step_scheduler is not None:
                step_scheduler()
            loss_sum += loss.detach() * y.shape[0]
            # Mixed batches (cifar_run.mix) carry label probabilities: a prediction counts as
            # correct when it names the label with the larger share.
            labels = y.argmax(1) if y.ndim == 2 else y
            correct += (out.detach().argmax(1) == labels).sum()
            n += y.shape[0]
            recent.add(loss, lr)
    recent.check()
    return _stats(loss_sum, correct, n, t0)


class _RecentLosses:
    """The last few step losses, on the device, looked at every `every` steps."""

    def __init__(self, every: int, device: torch.device) -> None:
        self.every = max(1, every)
        self.losses = torch.zeros(self.every, device=device)
        self.lrs: list[float] = []  # learning rate of each step since the last look
        self.first_step = 1  # step number of losses[0]

    def add(self, loss: torch.Tensor, lr: float) -> None:
        self.losses[len(self.lrs)] = loss.detach()  # a device copy, no synchronisation
        self.lrs.append(lr)
        if len(self.lrs) == self.every:
            self.check()

    def check(self) -> None:
        count = len(self.lrs)
        if count == 0:
            return
        window = self.losses[:count]
        if not bool(torch.isfinite(window).all()):  # the one host synchronisation per look
            i = int((~torch.isfinite(window)).nonzero()[0])
            raise NonFiniteLoss(self.first_step + i, float(window[i]), float(self.lrs[i]))
        self.first_step += count
        self.lrs.clear()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    autocast: torch.dtype | None = None,
    tta: str = "none",
    num_classes: int | None = None,
) -> EpochStats:
    """Mean loss and accuracy of `model` over `batches`, in eval mode (`autocast` as in
    `train_one_epoch`; the loss is summed in fp32). With `num_classes`, also the confusion
    matrix of the pass (EpochStats.confusion).

    `tta="flip"`: test-time augmentation, the mean of the logits for each image and its
    mirror image (airbench's and Page's flip TTA); "none": the images as they are.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r}: allowed: {', '.join(TTA_MODES)}")
    model.eval()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    k = num_classes or 0
    # Counted by comparison with every (true, predicted) code rather than by bincount or
    # scatter, so that deterministic=true has nothing to refuse on CUDA; 1000 x 100 compares.
    codes = torch.arange(k * k, device=device)
    counts = torch.zeros(k * k, device=device, dtype=torch.long)
    n = 0
    for x, y in batches:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
            if tta == "flip":
                out = (out.float() + model(x.flip(3)).float()) / 2
        loss_sum += criterion(out.float(), y) * y.shape[0]
        pred = out.argmax(1)
        correct += (pred == y).sum()
        if k:
            counts += ((y * k + pred).unsqueeze(1) == codes).sum(0)
        n += y.shape[0]
    stats = _stats(loss_sum, correct, n, t0)
    if k:
        stats.confusion = counts.view(k, k).cpu()
    return stats
