"""The pruning stage of a run: prune the trained model, evaluate, fine-tune, report.

Pruned and dense numbers come from the same trained weights: the run hands over the dense
best model after it has been evaluated on validation and test; this stage prunes it in
place, evaluates it again, fine-tunes it with the masks held if asked (evaluating again),
and makes the pruning permanent. `pruning.curve` amounts are evaluated on pruned copies of
the dense model before that, without retraining. The stage hands a resume point to run.py
after every pruning step's evaluation and fine-tuning epoch, and continues from one.

No Hydra here: run.py passes plain objects (settings, batches, an optimizer factory).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_run import atomic, report
from cifar_run.accel import loss_scaler
from cifar_run.checkpoint import cpu_state
from cifar_run.ema import step_function, weight_average
from cifar_run.engine import Batches, EpochStats, NonFiniteLoss, evaluate, train_one_epoch
from cifar_run.errors import TrainingDiverged
from cifar_run.pruning import (
    ParamList,
    PruningSettings,
    apply_global_l1,
    attach_masks,
    checkpoint_sizes,
    detach_masked_weights,
    fully_pruned_layers,
    global_sparsity,
    make_permanent,
    prunable_parameters,
    prune_copy,
    sparsity_table,
    step_targets,
)
from cifar_run.split import BatchSplit

log = logging.getLogger(__name__)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
# Writes the stage's resume point (run.py adds the random states and the file); the payload
# is what run_pruning(resume=...) takes back.
StageSaver = Callable[[dict[str, Any]], None]

SPARSITY_COLUMNS = ("name", "shape", "weights", "zeros", "sparsity")
CURVE_COLUMNS = (
    "amount",
    "sparsity",
    "nonzero_params",
    "val_acc",
    "test_acc",
    "fully_pruned_layers",
)
FINETUNE_COLUMNS = (
    "step",
    "epoch",
    "sparsity",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
)
# Extra columns of the results table (results.csv/md) when a run prunes.
PRUNED_COLUMNS = (
    "pruned",
    "prune",
    "sparsity",
    "nonzero_params",
    "compression",
    "finetune_epochs",
    "ckpt_bytes",
    "ckpt_gzip_bytes",
)


@dataclass
class StageData:
    """What a run trains and evaluates on (its batches, losses, precision and TTA): run.py's
    epochs and this stage's fine-tuning go through the same two methods."""

    train: Batches
    val: Batches
    test: Batches
    criterion: Criterion  # training loss (label smoothing included)
    eval_criterion: Criterion
    has_val: bool
    device: torch.device
    autocast: torch.dtype | None = None  # the run's precision, so dense and pruned rows compare
    tta: str = "none"  # and its test-time augmentation
    grad_clip: float | None = None  # max L2 norm of the gradients per step (optim.grad_clip)
    split: BatchSplit | None = None  # batch halves on two threads (accel.batch_split)

    def evaluate(
        self, model: nn.Module, batches: Batches, num_classes: int | None = None
    ) -> EpochStats:
        """`model` on `batches` the way the run evaluated the dense model (with
        `num_classes`: and its confusion matrix)."""
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
    ) -> tuple[EpochStats, EpochStats]:
        """One training pass over `train`, then `eval_model` (default: `model`) on `val`:
        (train, val) statistics. Raises engine.NonFiniteLoss when the loss goes NaN or
        infinite."""
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
            split=self.split,
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


def _counts(model: nn.Module, params: list[tuple[nn.Module, str]], total_params: int) -> dict:
    rows = sparsity_table(model, params)
    zeros = sum(r["zeros"] for r in rows)
    nonzero = total_params - zeros
    return {
        "rows": rows,
        "sparsity": global_sparsity(rows),
        "zeros": zeros,
        "nonzero_params": nonzero,
        "compression": total_params / nonzero if nonzero else math.inf,
    }


def _warn_fully_pruned(layers: Sequence[str], what: str) -> None:
    if layers:
        log.warning(
            "%s: layer(s) %s are 100%% pruned (every weight is zero; they pass only their "
            "bias); lower the amount or set pruning.include_classifier=false",
            what,
            ", ".join(layers),
        )


def run_curve(
    model: nn.Module,
    settings: PruningSettings,
    data: StageData,
    *,
    total_params: int,
    dense_val_acc: float,
    dense_test_acc: float,
) -> list[dict[str, Any]]:
    """Accuracy at each `pruning.curve` amount, from pruned copies of the dense `model`.

    The dense model itself is the amount-0 point (its accuracies are the run's own).
    """
    rows = []
    for amount in sorted(set(settings.curve) | {0.0}):
        if amount == 0.0:
            pruned, val_acc, test_acc = model, dense_val_acc, dense_test_acc
        else:
            pruned = prune_copy(model, amount, settings.include_classifier)
            val_acc = data.evaluate(pruned, data.val).acc
            test_acc = data.evaluate(pruned, data.test).acc
        counts = _counts(
            pruned, prunable_parameters(pruned, settings.include_classifier), total_params
        )
        full = fully_pruned_layers(counts["rows"])
        _warn_fully_pruned(full, f"pruning.curve amount {amount:g}")
        log.info(
            "curve: amount %g  sparsity %.4f  val acc %.2f  test acc %.2f",
            amount,
            counts["sparsity"],
            val_acc,
            test_acc,
        )
        rows.append(
            {
                "amount": amount,
                "sparsity": counts["sparsity"],
                "nonzero_params": counts["nonzero_params"],
                "val_acc": val_acc,
                "test_acc": test_acc,
                "fully_pruned_layers": ";".join(full),
            }
        )
    return rows


def _finetune(
    model: nn.Module,
    data: StageData,
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
    evaluated = model if average is None else average.module
    history: list[dict[str, Any]] = []
    best_acc, best_state, best_epoch = -math.inf, None, 0
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        history = [dict(r) for r in resume["rows"]]
        best = resume["best"]
        best_acc, best_epoch, best_state = float(best["acc"]), int(best["epoch"]), best["state"]
        first = int(resume["epoch"]) + 1
        if average is not None and resume.get("ema") is not None:
            average.load_state_dict(resume["ema"])
    for epoch in range(first, epochs + 1):
        if keep_best and early_stop is not None and epoch - 1 - best_epoch >= early_stop:
            log.info(
                "fine-tuning stops after epoch %d (pruning.early_stop=%d): val acc has not "
                "beaten epoch %d's %.2f",
                epoch - 1,
                early_stop,
                best_epoch,
                best_acc,
            )
            break
        t0 = time.perf_counter()
        desc = f"fine-tune {epoch}/{epochs}" + (f" (step {step}/{steps})" if steps > 1 else "")
        try:
            train, val = data.train_epoch(
                model,
                optimizer,
                scaler=scaler,
                desc=desc,
                after_step=None if average is None else step_function(average, model),
                eval_model=evaluated,
            )
        except NonFiniteLoss as exc:
            raise TrainingDiverged(
                f"fine-tuning diverged: loss {exc.loss} at pruning step {step}/{steps}, "
                f"fine-tune epoch {epoch}, step {exc.step} (lr {lr:.4g}); "
                "try a lower pruning.finetune_lr"
            ) from None
        row = {
            "step": step,
            "epoch": epoch,
            "sparsity": sparsity,
            **epoch_metrics(train, val),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "fine-tune step %d/%d epoch %d/%d  train loss %.4f acc %.2f  val loss %.4f acc %.2f",
            step,
            steps,
            epoch,
            epochs,
            train.loss,
            train.acc,
            val.loss,
            val.acc,
        )
        if keep_best and (not data.has_val or val.acc > best_acc):
            best_acc, best_state, best_epoch = val.acc, cpu_state(evaluated), epoch
        if save is not None:
            save(
                {
                    "epoch": epoch,
                    "rows": history,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": None if average is None else average.state_dict(),
                    "best": {"acc": best_acc, "epoch": best_epoch, "state": best_state},
                }
            )
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)  # same keys: weight_orig and weight_mask
        return history, best_acc
    if average is not None:  # the next pruning step starts from the weights validated
        model.load_state_dict(average.module.state_dict())
    return history, history[-1]["val_acc"] if history else math.nan


def run_pruning(
    model: nn.Module,
    settings: PruningSettings,
    data: StageData,
    make_optimizer: OptimizerFactory,
    *,
    total_params: int,
    finetune_lr: float,
    out_dir: Path | None,
    ema: float | None = None,
    save: StageSaver | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune `model` in place (dense best weights, already evaluated); return results keys.

    Iterative pruning (`steps` > 1) prunes to prune*k/steps at step k and fine-tunes
    `finetune_epochs` after every step. `pruned_*` accuracies are measured right after the
    last pruning step (for steps=1: the one-shot pruned model), `finetuned_*` after the
    fine-tuning that follows it. With `ema`, each fine-tuning keeps a moving average of the
    weights from its start and validates and keeps that (see `_finetune`).

    `save` receives the stage's resume point after each evaluated pruning step and each
    fine-tuning epoch; `resume` (one of those payloads) continues from there with the same
    numbers as a stage that was never interrupted.
    """
    t_stage = time.perf_counter()
    dense_state = cpu_state(model)
    params = prunable_parameters(model, settings.include_classifier)
    dense = _counts(model, params, total_params)
    dense_size = checkpoint_sizes(dense_state)

    history: list[dict[str, Any]] = []
    targets = step_targets(settings.amount, settings.steps)
    results: dict[str, Any] = {}
    resume_step = 0
    if resume is not None:
        attach_masks(params)  # all ones: their values come with the state dict
        model.load_state_dict(resume["model"])
        history = [dict(r) for r in resume["history"]]
        results = dict(resume["results"])
        resume_step = int(resume["step"])
        log.info("pruning stage: resuming at step %d of %d", resume_step, len(targets))

    def checkpoint(step: int, finetune: dict[str, Any] | None) -> None:
        if save is not None:
            save(
                {
                    "step": step,
                    "model": cpu_state(model),
                    "history": history,
                    "results": results,
                    "finetune": finetune,
                }
            )

    for step, target in enumerate(targets, start=1):
        if step < resume_step:
            continue
        last = step == len(targets)
        # The step the stop came in: it was pruned and evaluated then, its masks came back above.
        resumed = resume is not None and step == resume_step
        if not resumed:
            apply_global_l1(params, target)
        sparsity = global_sparsity(sparsity_table(model, params))
        finetune_resume = resume["finetune"] if resumed else None
        if not resumed:
            if not last and settings.finetune_epochs == 0:
                continue
            val = data.evaluate(model, data.val)
            log.info(
                "pruning step %d/%d: sparsity %.4f  val acc %.2f",
                step,
                len(targets),
                sparsity,
                val.acc,
            )
            history.append({"step": step, "epoch": 0, "sparsity": sparsity, **_val_row(val)})
            if last:
                test = data.evaluate(model, data.test)
                results["pruned_val_acc"] = val.acc
                results["pruned_test_acc"] = test.acc
                log.info("pruned: val acc %.2f  test acc %.2f", val.acc, test.acc)
            checkpoint(step, None)
        if settings.finetune_epochs > 0:
            rows, kept_val = _finetune(
                model,
                data,
                make_optimizer,
                epochs=settings.finetune_epochs,
                lr=finetune_lr,
                step=step,
                steps=len(targets),
                sparsity=sparsity,
                keep_best=last,
                early_stop=settings.early_stop,
                ema=ema,
                params=params,
                resume=finetune_resume,
                save=lambda finetune, step=step: checkpoint(step, finetune),
            )
            history += rows
            if last:
                results["finetune_epochs_run"] = len(rows)
                test = data.evaluate(model, data.test)
                results["finetuned_val_acc"] = kept_val
                results["finetuned_test_acc"] = test.acc
                log.info("fine-tuned: val acc %.2f  test acc %.2f", kept_val, test.acc)

    make_permanent(model)
    pruned = _counts(model, params, total_params)
    full = fully_pruned_layers(pruned["rows"])
    _warn_fully_pruned(full, f"prune={settings.amount:g}")
    pruned_state = cpu_state(model)
    pruned_size = checkpoint_sizes(pruned_state)
    log.info(
        "pruned model: sparsity %.4f, %d of %d parameters non-zero (%.2fx); "
        "checkpoint %d bytes, gzip %d (dense %d, gzip %d)",
        pruned["sparsity"],
        pruned["nonzero_params"],
        total_params,
        pruned["compression"],
        pruned_size["bytes"],
        pruned_size["gzip_bytes"],
        dense_size["bytes"],
        dense_size["gzip_bytes"],
    )
    if out_dir is not None:
        atomic.torch_save(pruned_state, out_dir / "checkpoints" / "pruned.pt")
        report.write_csv(out_dir / "sparsity.csv", pruned["rows"], SPARSITY_COLUMNS)
        if any(r["epoch"] > 0 for r in history):
            report.write_csv(out_dir / "finetune.csv", history, FINETUNE_COLUMNS)

    results.update(
        {
            "prune": settings.amount,
            "sparsity": pruned["sparsity"],
            "nonzero_params": pruned["nonzero_params"],
            "compression": pruned["compression"],
            "dense_sparsity": dense["sparsity"],
            "dense_nonzero_params": dense["nonzero_params"],
            "dense_ckpt_bytes": dense_size["bytes"],
            "dense_ckpt_gzip_bytes": dense_size["gzip_bytes"],
            "pruned_ckpt_bytes": pruned_size["bytes"],
            "pruned_ckpt_gzip_bytes": pruned_size["gzip_bytes"],
            "fully_pruned_layers": full,
            "pruning_include_classifier": settings.include_classifier,
            "pruning_steps": settings.steps,
            "finetune_epochs": settings.finetune_epochs,
            "finetune_lr": finetune_lr if settings.finetune_epochs > 0 else None,
            "finetune_early_stop": settings.early_stop if settings.finetune_epochs > 0 else None,
            "prune_seconds": time.perf_counter() - t_stage,
        }
    )
    return results


def _val_row(val: Any) -> dict[str, Any]:
    return {"val_loss": val.loss, "val_acc": val.acc}


def table_rows(results: Mapping[str, Any], base_columns: Sequence[str]) -> list[dict[str, Any]]:
    """The results table of a pruning run: the dense row, then the pruned row.

    Both rows share the run's settings and `best_epoch` (the pruned model is made from that
    epoch's weights). The pruned row's `best_val_acc`/`test_acc` are those of the final
    pruned model: fine-tuned when `finetune_epochs` > 0, else straight after pruning.
    """
    base = {c: results.get(c) for c in base_columns}
    params = results["params"]
    finetuned = "finetuned_test_acc" in results
    dense_row = {
        **base,
        "pruned": False,
        "prune": 0.0,
        "sparsity": results["dense_sparsity"],
        "nonzero_params": results["dense_nonzero_params"],
        "compression": params / results["dense_nonzero_params"],
        "finetune_epochs": 0,
        "ckpt_bytes": results["dense_ckpt_bytes"],
        "ckpt_gzip_bytes": results["dense_ckpt_gzip_bytes"],
    }
    pruned_row = {
        **base,
        "best_val_acc": results["finetuned_val_acc" if finetuned else "pruned_val_acc"],
        "test_acc": results["finetuned_test_acc" if finetuned else "pruned_test_acc"],
        "pruned": True,
        "prune": results["prune"],
        "sparsity": results["sparsity"],
        "nonzero_params": results["nonzero_params"],
        "compression": results["compression"],
        "finetune_epochs": results["finetune_epochs"],
        "ckpt_bytes": results["pruned_ckpt_bytes"],
        "ckpt_gzip_bytes": results["pruned_ckpt_gzip_bytes"],
    }
    return [dense_row, pruned_row]
