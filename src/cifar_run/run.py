"""run(cfg) -> results: build data, model and optimizer, train, test once, write the run folder.

This is the one place that reads the config; the engine below it sees plain objects.
With `prune` > 0 (or a `pruning.curve`) the pruning stage (prune/stage.py) follows on the
same trained weights.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run.config.checks import validate
from cifar_run.config.data_keys import class_count, follow_data, image_size, size_setting
from cifar_run.data.augment import build_augment, normalization
from cifar_run.data.loader import DeviceLoader
from cifar_run.data.mix import build_mix
from cifar_run.data.sources import Splits, load_splits
from cifar_run.engine import checkpoint
from cifar_run.engine.ema import step_function, weight_average
from cifar_run.engine.loop import LoopData, LoopState, NonFiniteLoss, Plan, cpu_state, fit
from cifar_run.engine.optim import build_optimizer, build_scheduler
from cifar_run.engine.reproducibility import set_deterministic
from cifar_run.engine.resume import open_run_folder
from cifar_run.errors import TrainingDiverged
from cifar_run.models import build_model, check_input, count_parameters
from cifar_run.outputs import atomic, folder_lock
from cifar_run.outputs import files as report
from cifar_run.outputs.loggers.tracker import Tracker
from cifar_run.preview import write_preview
from cifar_run.prune import curve as prune_curve
from cifar_run.prune import stage as prune_stage
from cifar_run.prune.settings import PruningSettings, validate_pruning
from cifar_run.run_info import base_results, data_results, dry_run_text
from cifar_run.speed.settings import SpeedSettings
from cifar_run.speed.setup import Speed, speed_setup
from cifar_run.speed.threads import set_threads

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000  # evaluation has no gradients, so a large batch is cheap and fast


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, out_dir: Path | None) -> dict[str, Any]:
    """Train and evaluate one configuration; write the run folder `out_dir` (None: no files).

    The folder is locked while the run writes into it (outputs/folder_lock.py): a second process
    into the same folder is refused with a UserError naming the one that holds it."""
    validate(cfg)
    if out_dir is None or cfg.dry_run:
        return _run(cfg, out_dir)
    out_dir = Path(out_dir)
    if cfg.resume and not out_dir.is_dir():  # nothing to lock: _run says what is missing
        return _run(cfg, out_dir)
    with folder_lock.held(out_dir, "hydra.run.dir"):
        for folder in (out_dir, out_dir / checkpoint.STATE_FILE.parent):
            atomic.remove_stale_temps(folder)  # left by a run killed while it wrote
        return _run(cfg, out_dir)


def _run(cfg: DictConfig, out_dir: Path | None) -> dict[str, Any]:
    cfg = follow_data(cfg)  # the model keys that follow the data, as config.yaml records them
    settings = validate_pruning(cfg.prune, cfg.pruning)
    speed_settings = SpeedSettings.from_config(cfg.get("speed"))
    set_threads(cfg.get("threads"))  # parallel sweep jobs share the cores
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # what allocates on "the" GPU uses this one too
    resume_from, done = open_run_folder(cfg, out_dir, device)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    side, size_key = image_size(cfg.data), size_setting(cfg.data)
    check_input(model, side, class_count(cfg.data), str(cfg.model.name), size_key)
    # Before dry_run's summary, so that a dry run checks the file; a resumed run's weights
    # come from its state.pt instead.
    if cfg.get("ckpt_path") is not None and not cfg.resume:
        checkpoint.load_weights(model, cfg.ckpt_path)
    params = count_parameters(model)
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    augment = build_augment(cfg.augment)
    if cfg.dry_run:
        print(dry_run_text(cfg, model, params, device), flush=True)
        return {"status": "dry_run", "params": params}
    if cfg.preview:
        return write_preview(cfg, augment, out_dir)

    results = base_results(cfg, params, device)
    if out_dir is not None:
        if resume_from is None:  # a resumed run keeps the record of how it was started
            atomic.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        report.write_status(out_dir, {**results, "status": "running"})
    tracker = Tracker(cfg, out_dir)
    try:
        speed = speed_setup(model, device, cfg.precision, cfg.compile, speed_settings)
        job = Job(cfg, model, optimizer, speed, device, out_dir, resume_from, settings, tracker)
        results.update(_train(job, augment, results))
        results = _complete(cfg, results, settings, out_dir)
    except BaseException as exc:
        if out_dir is not None:
            report.mark_failed(out_dir, results, exc)
        tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish(results)
    return results


def _complete(
    cfg: DictConfig, results: dict[str, Any], settings: PruningSettings, out_dir: Path | None
) -> dict[str, Any]:
    """results.json, results.csv/.md with status completed; the resume points go."""
    rows, notes = None, []
    if settings.enabled:
        rows = prune_stage.table_rows(results, report.RESULT_COLUMNS)
        results["rows"] = rows
        if results["fully_pruned_layers"]:
            notes.append(
                "warning: 100% pruned (every weight zero): "
                + ", ".join(results["fully_pruned_layers"])
            )
    results["status"] = "completed"
    if out_dir is not None:
        report.write_results(out_dir, results, rows, notes)
        # Only a resume in the middle of the pruning stage needs it.
        checkpoint.stage_path(out_dir).unlink(missing_ok=True)
        if not cfg.keep_state:  # only after results.json says completed: a resume needs it
            checkpoint.state_path(out_dir).unlink(missing_ok=True)
    return results


@dataclass
class Job:
    """One run's objects, built from the config, as the training and pruning steps use them."""

    cfg: DictConfig
    model: nn.Module  # the weights saved, tested and pruned (speed.net is what is called)
    optimizer: torch.optim.Optimizer
    speed: Speed
    device: torch.device
    out_dir: Path | None
    resume_from: checkpoint.Checkpoint | None
    settings: PruningSettings
    tracker: Tracker = field(default_factory=Tracker)  # the run's loggers (none by default)


def _loop_data(job: Job, splits: Splits, augment: Any, stats: tuple) -> tuple[LoopData, dict]:
    """The run's batches and losses (`stats`: the normalization's mean and std), and the
    random generators an epoch draws from."""
    cfg, speed, (mean, std) = job.cfg, job.speed, stats
    norm = {
        "device": job.device,
        "mean": mean,
        "std": std,
        "memory_format": speed.memory_format,
    }
    mix = build_mix(cfg.get("mix"), num_classes=len(splits.classes))
    train = DeviceLoader(
        splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, mix=mix, **norm
    )
    data = LoopData(
        train=train,
        val=DeviceLoader(splits.val, EVAL_BATCH_SIZE, **norm),
        test=DeviceLoader(splits.test, EVAL_BATCH_SIZE, **norm),
        criterion=nn.CrossEntropyLoss(label_smoothing=float(cfg.optim.get("label_smoothing", 0))),
        eval_criterion=nn.CrossEntropyLoss(),
        has_val=len(splits.val) > 0,
        device=job.device,
        autocast=speed.precision.dtype,
        tta=cfg.tta,
        grad_clip=cfg.optim.get("grad_clip"),
        steps=speed,
    )
    # Every random stream an epoch draws from, saved and restored with the checkpoint.
    generators = {"order": train.order_generator, "augment": train.augment_generator}
    if mix is not None:  # only then: a run saves the streams it draws from, and no others
        generators["mix"] = train.mix_generator
    return data, generators


def _train(job: Job, augment: Any, results: dict[str, Any]) -> dict[str, Any]:
    """Train, select on validation, test once; then the pruning stage if asked. What the
    loaded data was goes into `results` (and the running results.json) first, so that a run
    failing later still records it."""
    cfg = job.cfg
    splits = load_splits(cfg.data)
    mean, std = normalization(cfg.augment.normalize, splits.train.images, cfg.data.name)
    about_data = data_results(splits, mean, std, job.speed.memory_format)
    results.update(about_data)
    if job.out_dir is not None:
        report.write_status(job.out_dir, {**results, "status": "running"})
    log.info(
        "precision %s, %d CPU threads, compile %s, speed: %s, memory format %s",
        job.speed.precision.name,
        torch.get_num_threads(),
        cfg.compile,
        job.speed.describe(),
        about_data["memory_format"],
    )
    data, generators = _loop_data(job, splits, augment, (mean, std))
    loop = _train_epochs(job, data, generators)
    results = {**about_data, **_test(job, data, loop, list(splits.classes))}
    results["skipped_images"] = len(splits.skipped)  # unreadable files of an image folder
    if job.settings.enabled or job.settings.curve:
        results.update(_prune(job, data, generators, results))
    return results


def _train_epochs(job: Job, data: LoopData, generators: dict) -> LoopState:
    """The epochs (or, with epochs=0, ckpt_path's weights validated as they are); the best
    epoch's weights end in `job.model`'s best state."""
    cfg, model, out_dir, speed = job.cfg, job.model, job.out_dir, job.speed
    # epochs=0 (evaluate ckpt_path) trains nothing, so it has no schedule to build.
    schedule = None
    if cfg.epochs > 0:
        schedule = build_scheduler(
            cfg.sched, job.optimizer, epochs=cfg.epochs, steps_per_epoch=len(data.train)
        )
    # The weights evaluated, selected, tested and pruned: the model's, or their average's.
    ema = weight_average(model, cfg.ema) if cfg.get("ema") is not None else None
    evaluated = model if ema is None else ema.module
    # What state.pt holds the state of: restored from it on resume, saved into it after
    # every epoch, so the two cannot list different objects.
    stateful = {
        "model": model,
        "optimizer": job.optimizer,
        "scheduler": schedule,
        "generators": generators,
        "scaler": speed.scaler,
        "ema": ema,
    }
    loop = LoopState()
    if job.resume_from is not None:
        loop = checkpoint.restore(job.resume_from, **stateful)
        log.info(
            "resuming after epoch %d of %d from %s", loop.epoch, cfg.epochs, job.resume_from.path
        )
        if out_dir is not None:  # files of an epoch that ran past the checkpoint are redone
            report.write_metrics(out_dir, loop.history)
        checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
    save_state = partial(checkpoint.save, out_dir, loop, cfg=cfg, device=job.device, **stateful)
    job.tracker.open(
        done_epochs=loop.epoch, steps_per_epoch=len(data.train), resumed=job.resume_from is not None
    )

    def on_epoch(loop: LoopState) -> None:
        if loop.best_epoch == loop.epoch:
            checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
        if out_dir is not None:
            report.write_metrics(out_dir, loop.history)
            checkpoint.save_weights(out_dir, checkpoint.LAST_FILE, cpu_state(evaluated))
            job.tracker.epoch_end(loop.history[-1])
            save_state()  # last: the files above are redone on resume; this says what is done

    plan = Plan(cfg.epochs, lambda epoch: f"epoch {epoch}/{cfg.epochs}", cfg.get("early_stop"))
    try:
        fit(
            speed.net,
            data,
            job.optimizer,
            loop,
            plan,
            scaler=speed.scaler,
            schedule=schedule,
            after_step=None if ema is None else step_function(ema, model),
            eval_model=evaluated,
            on_epoch=on_epoch,
            on_step=job.tracker.step_hook,
        )
    except NonFiniteLoss as exc:
        raise _diverged(exc, len(data.train), loop, out_dir) from None
    if loop.best_state is None:  # epochs=0: the weights of ckpt_path, validated as they are
        val = data.evaluate(speed.net, data.val)
        loop.best_acc, loop.best_state = val.acc, cpu_state(model)
        log.info("epochs=0: %s as it is, val acc %.2f", cfg.ckpt_path, val.acc)
        if out_dir is not None:
            report.write_metrics(out_dir, loop.history)
        checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
        # Fine-tuning in a pruning stage can take longer than the training did: with this
        # resume point at "epoch 0", an interrupted stage goes on from its own
        # prune_state.pt instead of starting again. Evaluating alone needs none.
        if job.settings.enabled and out_dir is not None:
            save_state()
    return loop


def _test(job: Job, data: LoopData, loop: LoopState, classes: list[str]) -> dict[str, Any]:
    """The test set, evaluated once with the weights chosen on validation; plots."""
    cfg, model, out_dir = job.cfg, job.model, job.out_dir
    model.load_state_dict(loop.best_state)
    test = data.evaluate(job.speed.net, data.test, num_classes=len(classes))
    log.info(
        "best epoch %d (val acc %.2f): test acc %.2f", loop.best_epoch, loop.best_acc, test.acc
    )
    confusion = test.confusion.tolist() if test.confusion is not None else []
    class_acc = report.class_accuracy(classes, confusion) if confusion else {}
    log.info(
        "test acc per class: %s",
        ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in class_acc.items()),
    )
    history = loop.history
    if out_dir is not None:
        if history:
            report.plot_curves(out_dir, history, title=str(cfg.model.name))
        if confusion:
            report.write_confusion(out_dir, classes, confusion)
            report.plot_confusion(out_dir, classes, confusion, title=str(cfg.model.name))
    return {
        "best_val_acc": loop.best_acc,
        "best_epoch": loop.best_epoch,
        "test_acc": test.acc,
        "test_loss": test.loss,
        "train_seconds": sum(r["seconds"] for r in history),
        "test_seconds": test.seconds,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "epochs_run": loop.epoch,
        "stopped_early": loop.epoch < cfg.epochs,
        "test_class_acc": class_acc,
    }


def _prune(job: Job, data: LoopData, generators: dict, dense: dict[str, Any]) -> dict[str, Any]:
    """The pruning stage, from the weights just tested (the best epoch's); it keeps its own
    resume point (checkpoint.STAGE_FILE), as training keeps state.pt."""
    cfg, model, out_dir, settings = job.cfg, job.model, job.out_dir, job.settings
    params = count_parameters(model)
    stage_resume = None
    if settings.enabled and out_dir is not None and job.resume_from is not None:
        stage_resume = checkpoint.load_stage(out_dir, cfg, generators)
    results: dict[str, Any] = {}
    curve = None
    if settings.curve:
        # A stage's resume point exists only once the curve was done: it carries the rows.
        if stage_resume is not None and stage_resume.get("curve") is not None:
            curve = stage_resume["curve"]
        else:
            curve = prune_curve.run_curve(
                model,
                settings,
                data,
                total_params=params,
                dense_val_acc=dense["best_val_acc"],
                dense_test_acc=dense["test_acc"],
            )
        results["curve"] = curve
        if out_dir is not None:
            report.write_csv(out_dir / "curve.csv", curve, prune_curve.CURVE_COLUMNS)
            report.plot_sparsity(out_dir, curve, title=str(cfg.model.name))
    if not settings.enabled:
        return results
    save_stage = None
    if out_dir is not None:
        save_stage = partial(
            checkpoint.save_stage, out_dir, generators=generators, cfg=cfg, curve=curve
        )

    def make_optimizer(p: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return build_optimizer(cfg.optim, p, lr)

    results.update(
        prune_stage.run_pruning(
            model,
            settings,
            data,
            make_optimizer,
            total_params=params,
            finetune_lr=settings.resolved_finetune_lr(cfg.lr),
            out_dir=out_dir,
            ema=cfg.get("ema"),
            save=save_stage,
            resume=stage_resume,
        )
    )
    return results


def _diverged(
    exc: NonFiniteLoss, steps: int, loop: LoopState, out_dir: Path | None
) -> TrainingDiverged:
    if out_dir is None:
        kept = "no checkpoints are written without a run folder"
    elif loop.epoch == 0:
        kept = "no epoch finished, so there is no checkpoint"
    else:
        kept = f"the last good checkpoint ({checkpoint.STATE_FILE}) is from epoch {loop.epoch}"
    return TrainingDiverged(
        f"training diverged: loss {exc.loss} at epoch {exc.epoch}, step {exc.step}/{steps} "
        f"(lr {exc.lr:.4g}); {kept}; try a lower lr"
    )
