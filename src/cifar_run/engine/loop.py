"""The training loop: one epoch, one evaluation pass, and `fit`, the epochs with early stop,
keep-best and a callback after each. No Hydra, no files, no config objects.

Training, fine-tuning after pruning and the pruning curve all go through `LoopData`. The
loop's one handle on the speed layer is `EpochSteps.epoch` (cifar_run.speed.interface).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cifar_run.constants import TTA_MODES
from cifar_run.speed.interface import PLAIN, Criterion, EpochSteps

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# Called after every training step with (the step's number within the epoch, from 1; its
# loss, a detached tensor still on the device; the learning rate it used). It must not read
# the loss's value, which would be a host synchronisation per step: keep it and read many
# at once.
StepHook = Callable[[int, torch.Tensor, float], None]

log = logging.getLogger(__name__)

# Steps between looks at the loss for NaN/inf. A look is one host synchronisation; checking
# every step would stall a GPU pipeline each batch. The losses since the last look are kept on
# the device, so the first bad step is still named exactly; up to CHECK_EVERY - 1 further steps
# then run on diverged weights, which are thrown away (nothing of that epoch is saved).
CHECK_EVERY = 50


class NonFiniteLoss(RuntimeError):
    """The training loss was NaN or infinite at `step` (1-based, within the epoch); `fit`
    sets the epoch."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(f"loss is {loss} at step {step} (lr {lr:.4g})")
        self.step, self.loss, self.lr = step, loss, lr
        self.epoch = 0


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
    criterion: Criterion,
    *,
    device: torch.device,
    step_scheduler: Callable[[], None] | None = None,
    desc: str = "train",
    check_every: int = CHECK_EVERY,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
    steps: EpochSteps | None = None,
    on_step: StepHook | None = None,
) -> EpochStats:
    """Train for one pass over `batches`; `step_scheduler` is called after every step.
    Labels are class indices (B,) or class probabilities (B, classes), e.g. mixup's.

    `autocast`: run the forward pass and loss under `torch.autocast` in that dtype (bf16 or
    fp16; None: fp32). `scaler`: scale the loss for fp16 (a GradScaler skips steps whose
    gradients overflowed; its inf check costs one host synchronisation per step on CUDA).
    `grad_clip`: scale the gradients of all parameters together down to at most this L2
    norm before each step (torch.nn.utils.clip_grad_norm_; with a scaler, of the unscaled
    gradients). `after_step` is called after every optimizer step (e.g. a weight average's
    update). `steps`: how each batch's forward and backward run, asked once for the epoch
    (cifar_run.speed.interface; None: the plain step). `on_step` gets each step's loss and
    learning rate (see StepHook).

    Raises NonFiniteLoss naming the first step whose loss was NaN or infinite, at most
    `check_every - 1` steps after it.
    """
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = step = 0
    total = len(batches) if isinstance(batches, Sized) else None
    recent = _RecentLosses(check_every, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with (steps or PLAIN).epoch(model, autocast, scaler) as forward_backward:
        for x, y in tqdm(batches, total=total, desc=desc, leave=False, disable=None):
            lr = optimizer.param_groups[0]["lr"]  # before a per-step scheduler moves it
            optimizer.zero_grad(set_to_none=True)
            loss, out = forward_backward(criterion, x, y)
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
            # Mixed batches (cifar_run.data.mix) carry label probabilities: a prediction
            # counts as correct when it names the label with the larger share.
            labels = y.argmax(1) if y.ndim == 2 else y
            correct += (out.detach().argmax(1) == labels).sum()
            n += y.shape[0]
            step += 1
            recent.add(loss, lr)
            if on_step is not None:
                on_step(step, loss.detach(), lr)
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
    criterion: Criterion,
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
    # (true, predicted) pairs as one code each, kept on the device and counted on the CPU at
    # the end (torch.bincount there is deterministic, so deterministic=true has nothing to
    # refuse on CUDA, and memory stays one integer per image whatever the class count).
    codes: list[torch.Tensor] = []
    n = 0
    for x, y in batches:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
            if tta == "flip":
                out = (out.float() + model(x.flip(3)).float()) / 2
        if k and out.shape[1] != k:
            raise ValueError(f"the model gives {out.shape[1]} outputs for {k} classes")
        loss_sum += criterion(out.float(), y) * y.shape[0]
        pred = out.argmax(1)
        correct += (pred == y).sum()
        if k:
            codes.append(y * k + pred)
        n += y.shape[0]
    stats = _stats(loss_sum, correct, n, t0)
    if k:
        seen = torch.cat(codes).cpu() if codes else torch.zeros(0, dtype=torch.long)
        stats.confusion = torch.bincount(seen, minlength=k * k).view(k, k)
    return stats


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict (what best.pt and last.pt hold)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class LoopState:
    """What the epoch loop carries from one epoch to the next."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    best_acc: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best weights


@dataclass
class LoopData:
    """What a run trains and evaluates on (its batches, losses, precision and TTA): the
    run's epochs, the pruning stage's fine-tuning and its curve go through it, so dense and
    pruned rows are measured alike."""

    train: Batches
    val: Batches
    test: Batches
    criterion: Criterion  # training loss (label smoothing included)
    eval_criterion: Criterion
    has_val: bool
    device: torch.device
    autocast: torch.dtype | None = None  # the run's precision
    tta: str = "none"  # and its test-time augmentation
    grad_clip: float | None = None  # max L2 norm of the gradients per step (optim.grad_clip)
    steps: EpochSteps = PLAIN  # how a batch's forward and backward run (the speed layer)

    def evaluate(
        self, model: nn.Module, batches: Batches, num_classes: int | None = None
    ) -> EpochStats:
        """`model` on `batches` the way the run evaluates (with `num_classes`: and its
        confusion matrix)."""
        return evaluate(
            model,
            batches,
            self.eval_criterion,
            device=self.device,
            autocast=self.autocast,
            tta=self.tta,
            num_classes=num_classes,
        )

    def train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None,
        desc: str,
        step_scheduler: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None,
        eval_model: nn.Module | None = None,
        on_step: StepHook | None = None,
    ) -> tuple[EpochStats, EpochStats]:
        """One training pass over `train`, then `eval_model` (default: `model`) on `val`."""
        train = train_one_epoch(
            model,
            self.train,
            optimizer,
            self.criterion,
            device=self.device,
            step_scheduler=step_scheduler,
            desc=desc,
            autocast=self.autocast,
            scaler=scaler,
            grad_clip=self.grad_clip,
            after_step=after_step,
            steps=self.steps,
            on_step=on_step,
        )
        return train, self.evaluate(model if eval_model is None else eval_model, self.val)


def epoch_metrics(train: EpochStats, val: EpochStats) -> dict[str, float]:
    """The loss and accuracy columns of a metrics row (metrics.csv, finetune.csv)."""
    return {
        "train_loss": train.loss,
        "train_acc": train.acc,
        "val_loss": val.loss,
        "val_acc": val.acc,
    }


@dataclass
class Plan:
    """How `fit` runs its epochs."""

    epochs: int  # the last epoch to run (the state says which ran already)
    label: Callable[[int], str]  # an epoch's name in the log and the progress bar
    early_stop: int | None = None  # epochs without a better val acc before stopping
    early_stop_key: str = "early_stop"  # the key that set it, for the log
    keep_best: bool = True  # track the best validation epoch's weights
    row: Mapping[str, Any] = field(default_factory=dict)  # extra columns of each row


def fit(
    model: nn.Module,
    data: LoopData,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    plan: Plan,
    *,
    scaler: torch.amp.GradScaler | None = None,
    schedule: Any = None,
    after_step: Callable[[], None] | None = None,
    eval_model: nn.Module | None = None,
    on_epoch: Callable[[LoopState], None] | None = None,
    on_step: StepHook | None = None,
) -> LoopState:
    """Train from epoch `state.epoch + 1` to `plan.epochs`, validating `eval_model`
    (default: `model`) after each; keep the best validation epoch's weights (without a
    validation split, the last epoch's) and stop early once it is `plan.early_stop` epochs
    old. `schedule` (engine.optim.Schedule) steps per batch and per epoch. `on_epoch` gets
    the state after every epoch (write files, save a resume point); `on_step`, every
    training step's loss (StepHook).

    Raises NonFiniteLoss with its `epoch` set when the loss goes NaN or infinite."""
    evaluated = model if eval_model is None else eval_model
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        # Checked before each epoch rather than after, so that a run resumed from the
        # checkpoint of the epoch that spent the patience stops there too.
        if _patience_spent(state, plan):
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            train, val = data.train_epoch(
                model,
                optimizer,
                scaler=scaler,
                desc=plan.label(epoch),
                step_scheduler=None if schedule is None else schedule.step_batch,
                after_step=after_step,
                eval_model=evaluated,
                on_step=on_step,
            )
        except NonFiniteLoss as exc:
            exc.epoch = epoch
            raise
        if schedule is not None:
            schedule.step_epoch({"val_loss": val.loss, "val_acc": val.acc})
        row = {**plan.row, "epoch": epoch, **epoch_metrics(train, val), "lr": lr}
        row["seconds"] = time.perf_counter() - t0
        state.history.append(row)
        _log_epoch(plan.label(epoch), train, val, lr, row["seconds"])
        if plan.keep_best and (not data.has_val or val.acc > state.best_acc):
            state.best_acc, state.best_epoch = val.acc, epoch
            state.best_state = cpu_state(evaluated)
        state.epoch = epoch
        if on_epoch is not None:
            on_epoch(state)
    return state


def _patience_spent(state: LoopState, plan: Plan) -> bool:
    if not plan.keep_best or plan.early_stop is None:
        return False
    if state.epoch - state.best_epoch < plan.early_stop:
        return False
    log.info(
        "early stop after epoch %d (%s=%d): val acc has not beaten epoch %d's %.2f",
        state.epoch,
        plan.early_stop_key,
        plan.early_stop,
        state.best_epoch,
        state.best_acc,
    )
    return True


def _log_epoch(label: str, train: EpochStats, val: EpochStats, lr: float, seconds: float) -> None:
    log.info(
        "%s  train loss %.4f acc %.2f  val loss %.4f acc %.2f  lr %.4g  %.1f s",
        label,
        train.loss,
        train.acc,
        val.loss,
        val.acc,
        lr,
        seconds,
    )
