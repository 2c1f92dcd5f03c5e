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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cifar_run.engine.loop import LoopData, cpu_state
from cifar_run.outputs import atomic
from cifar_run.outputs import files as report
from cifar_run.prune.curve import counts, warn_fully_pruned
from cifar_run.prune.finetune import OptimizerFactory, finetune
from cifar_run.prune.masks import (
    ParamList,
    apply_global_l1,
    attach_masks,
    checkpoint_sizes,
    fully_pruned_layers,
    global_sparsity,
    make_permanent,
    prunable_parameters,
    sparsity_table,
    step_targets,
)
from cifar_run.prune.settings import PruningSettings

log = logging.getLogger(__name__)

# Writes the stage's resume point (run.py adds the random states and the file); the payload
# is what run_pruning(resume=...) takes back.
StageSaver = Callable[[dict[str, Any]], None]

SPARSITY_COLUMNS = ("name", "shape", "weights", "zeros", "sparsity")
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


def run_pruning(
    model: nn.Module,
    settings: PruningSettings,
    data: LoopData,
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
    weights from its start and validates and keeps that (see prune.finetune).

    `save` receives the stage's resume point after each evaluated pruning step and each
    fine-tuning epoch; `resume` (one of those payloads) continues from there with the same
    numbers as a stage that was never interrupted.
    """
    t_stage = time.perf_counter()
    params = prunable_parameters(model, settings.include_classifier)
    dense = counts(model, params, total_params)
    dense_size = checkpoint_sizes(cpu_state(model))
    targets = step_targets(settings.amount, settings.steps)
    history: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    resume_step = 0
    if resume is not None:
        history, results, resume_step = _restore(model, params, resume, len(targets))

    def checkpoint(step: int, finetune: dict[str, Any] | None) -> None:
        if save is not None:
            payload = {"step": step, "model": cpu_state(model), "history": history}
            save({**payload, "results": results, "finetune": finetune})

    for step, target in enumerate(targets, start=1):
        if step < resume_step:
            continue
        last = step == len(targets)
        # The step the stop came in: it was pruned and evaluated then, its masks came back above.
        resumed = resume is not None and step == resume_step
        if not resumed:
            apply_global_l1(params, target)
        sparsity = global_sparsity(sparsity_table(model, params))
        if not resumed:
            if not last and settings.finetune_epochs == 0:
                continue
            history.append(_evaluate_step(model, data, step, len(targets), sparsity, results))
            checkpoint(step, None)
        if settings.finetune_epochs > 0:
            rows, kept_val = finetune(
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
                resume=resume["finetune"] if resumed else None,
                save=lambda finetune, step=step: checkpoint(step, finetune),
            )
            history += rows
            if last:
                results.update(_finetuned(model, data, rows, kept_val))

    pruned = _make_permanent(model, params, settings, total_params, dense_size, out_dir, history)
    results.update(pruned)
    results.update(_dense_and_settings(dense, dense_size, settings, finetune_lr))
    results["prune_seconds"] = time.perf_counter() - t_stage
    return results


def _dense_and_settings(
    dense: dict[str, Any],
    dense_size: dict[str, int],
    settings: PruningSettings,
    finetune_lr: float,
) -> dict[str, Any]:
    """The results keys of the dense model the stage started from, and of its settings."""
    finetunes = settings.finetune_epochs > 0
    return {
        "dense_sparsity": dense["sparsity"],
        "dense_nonzero_params": dense["nonzero_params"],
        "dense_ckpt_bytes": dense_size["bytes"],
        "dense_ckpt_gzip_bytes": dense_size["gzip_bytes"],
        "pruning_include_classifier": settings.include_classifier,
        "pruning_steps": settings.steps,
        "finetune_epochs": settings.finetune_epochs,
        "finetune_lr": finetune_lr if finetunes else None,
        "finetune_early_stop": settings.early_stop if finetunes else None,
    }


def _restore(
    model: nn.Module, params: ParamList, resume: Mapping[str, Any], steps: int
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Load a resume point into `model`: (the rows so far, the results so far, its step)."""
    attach_masks(params)  # all ones: their values come with the state dict
    model.load_state_dict(resume["model"])
    step = int(resume["step"])
    log.info("pruning stage: resuming at step %d of %d", step, steps)
    return [dict(r) for r in resume["history"]], dict(resume["results"]), step


def _evaluate_step(
    model: nn.Module,
    data: LoopData,
    step: int,
    steps: int,
    sparsity: float,
    results: dict[str, Any],
) -> dict[str, Any]:
    """Validate the model just pruned (the last step: test it too, into `results`); its
    row of finetune.csv."""
    val = data.evaluate(model, data.val)
    log.info("pruning step %d/%d: sparsity %.4f  val acc %.2f", step, steps, sparsity, val.acc)
    if step == steps:
        test = data.evaluate(model, data.test)
        results["pruned_val_acc"] = val.acc
        results["pruned_test_acc"] = test.acc
        log.info("pruned: val acc %.2f  test acc %.2f", val.acc, test.acc)
    return {
        "step": step,
        "epoch": 0,
        "sparsity": sparsity,
        "val_loss": val.loss,
        "val_acc": val.acc,
    }


def _finetuned(
    model: nn.Module, data: LoopData, rows: list[dict[str, Any]], kept_val: float
) -> dict[str, Any]:
    """The results keys of the last step's fine-tuning, its test set evaluated once."""
    test = data.evaluate(model, data.test)
    log.info("fine-tuned: val acc %.2f  test acc %.2f", kept_val, test.acc)
    return {
        "finetune_epochs_run": len(rows),
        "finetuned_val_acc": kept_val,
        "finetuned_test_acc": test.acc,
    }


def _make_permanent(
    model: nn.Module,
    params: ParamList,
    settings: PruningSettings,
    total_params: int,
    dense_size: dict[str, int],
    out_dir: Path | None,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fold the masks into the weights; write pruned.pt, sparsity.csv and finetune.csv."""
    make_permanent(model)
    pruned = counts(model, params, total_params)
    full = fully_pruned_layers(pruned["rows"])
    warn_fully_pruned(full, f"prune={settings.amount:g}")
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
    return {
        "prune": settings.amount,
        "sparsity": pruned["sparsity"],
        "nonzero_params": pruned["nonzero_params"],
        "compression": pruned["compression"],
        "pruned_ckpt_bytes": pruned_size["bytes"],
        "pruned_ckpt_gzip_bytes": pruned_size["gzip_bytes"],
        "fully_pruned_layers": full,
    }


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
