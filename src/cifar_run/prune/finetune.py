"""Fine-tuning after a pruning step: the run's loop (engine.loop.fit) with the masks held."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from cifar_run.engine.ema import WeightAverage, step_function, weight_average
from cifar_run.engine.loop import LoopData, LoopState, NonFiniteLoss, Plan, fit
from cifar_run.engine.precision import loss_scaler
from cifar_run.errors import TrainingDiverged
from cifar_run.prune.masks import ParamList, detach_masked_weights

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def finetune(
    model: nn.Module,
    data: LoopData,
    make_optimizer: OptimizerFactory,
    *,
    epochs: int,
    lr: float,
    step: int,
    steps: int,
    sparsity: float,
    keep_best: bool,
    params: ParamList,
    early_stop: int | None = None,
    ema: float | None = None,
    resume: Mapping[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Fine-tune with the masks attached; returns (history rows, val acc of the kept weights).

    A fresh optimizer (the run's optimizer settings, `lr`, no scheduler) sees `weight_orig`;
    the masks keep the pruned weights of the effective model at exactly 0. With `keep_best`
    the epoch with the best validation accuracy is kept, as in training, and `early_stop`
    ends the fine-tuning once that epoch is `early_stop` epochs old.

    With `ema` (the run's decay) a moving average of the weights, started from the pruned
    weights, is what is validated and kept, as in training; `model` ends with its weights.
    The average copies the masks (`params`, the pruned parameters) with the weights, so its
    pruned weights stay 0 too.

    After every epoch `save` gets what `resume` takes to continue after it (this step's rows,
    optimizer, scaler, average, best epoch so far).
    """
    optimizer = make_optimizer(model.parameters(), lr)
    scaler = loss_scaler(data.autocast, data.device)  # fp16 needs it here as in training
    average = None
    if ema is not None:
        detach_masked_weights(params)
        average = weight_average(model, ema)
    state = LoopState()
    if resume is not None:
        state = _restore(resume, optimizer, scaler, average)

    def label(epoch: int) -> str:
        return f"fine-tune {epoch}/{epochs}" + (f" (step {step}/{steps})" if steps > 1 else "")

    def on_epoch(state: LoopState) -> None:
        if save is not None:
            save(_resume_point(state, optimizer, scaler, average))

    plan = Plan(
        epochs=epochs,
        label=label,
        early_stop=early_stop,
        early_stop_key="pruning.early_stop",
        keep_best=keep_best,
        row={"step": step, "sparsity": sparsity},
    )
    try:
        fit(
            model,
            data,
            optimizer,
            state,
            plan,
            scaler=scaler,
            after_step=None if average is None else step_function(average, model),
            eval_model=None if average is None else average.module,
            on_epoch=on_epoch,
        )
    except NonFiniteLoss as exc:
        raise TrainingDiverged(
            f"fine-tuning diverged: loss {exc.loss} at pruning step {step}/{steps}, "
            f"fine-tune epoch {exc.epoch}, step {exc.step} (lr {lr:.4g}); "
            "try a lower pruning.finetune_lr"
        ) from None
    if keep_best and state.best_state is not None:
        model.load_state_dict(state.best_state)  # same keys: weight_orig and weight_mask
        return state.history, state.best_acc
    if average is not None:  # the next pruning step starts from the weights validated
        model.load_state_dict(average.module.state_dict())
    return state.history, state.history[-1]["val_acc"] if state.history else math.nan


def _resume_point(
    state: LoopState, optimizer: torch.optim.Optimizer, scaler: Any, average: WeightAverage | None
) -> dict[str, Any]:
    """What `_restore` takes to continue after the epoch `state` has ended."""
    return {
        "epoch": state.epoch,
        "rows": state.history,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": None if average is None else average.state_dict(),
        "best": {
            "acc": state.best_acc,
            "epoch": state.best_epoch,
            "state": state.best_state,
        },
    }


def _restore(
    resume: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    average: WeightAverage | None,
) -> LoopState:
    """Load a `_resume_point` into the freshly built optimizer, scaler and average; return
    the loop state to continue from."""
    optimizer.load_state_dict(resume["optimizer"])
    if scaler is not None and resume.get("scaler") is not None:
        scaler.load_state_dict(resume["scaler"])
    best = resume["best"]
    state = LoopState(
        epoch=int(resume["epoch"]),
        history=[dict(r) for r in resume["rows"]],
        best_acc=float(best["acc"]),
        best_epoch=int(best["epoch"]),
        best_state=best["state"],
    )
    if average is not None and resume.get("ema") is not None:
        average.load_state_dict(resume["ema"])
    return state
