"""run(cfg) -> results: build data, model and optimizer, train, test once, write the run folder.

This is the one place that reads the config; the engine below it sees plain objects.
With `prune` > 0 (or a `pruning.curve`) the pruning stage (prune_stage.py) follows on the
same trained weights.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run import accel, atomic, checkpoint, cores, prune_stage, report
from cifar_run.augment import build_augment, grid_png, normalization, preview_png
from cifar_run.checkpoint import LoopState
from cifar_run.config import validate
from cifar_run.data import Splits, load_data
from cifar_run.ema import step_function, weight_average
from cifar_run.engine import NonFiniteLoss
from cifar_run.errors import TrainingDiverged, UserError
from cifar_run.loader import DeviceLoader
from cifar_run.mix import build_mix, epoch_rng
from cifar_run.mix import preview_grid as mix_preview_grid
from cifar_run.models import build_model, count_parameters
from cifar_run.models.summary import layer_summary
from cifar_run.optim import build_optimizer, build_scheduler
from cifar_run.pruning_config import PruningSettings, validate_pruning
from cifar_run.reproducibility import environment, set_deterministic

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000  # evaluation has no gradients, so a large batch is cheap and fast
PREVIEW_IMAGES = 8  # rows of augment_preview.png


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _summary(cfg: DictConfig, model: nn.Module, params: int, device: torch.device) -> str:
    lines = [
        f"model: {cfg.model.name} ({type(model).__name__})",
        f"parameters: {params}",
        f"data: {cfg.data.name} (root {cfg.data.root}, val_size {cfg.data.val_size}, "
        f"subset {cfg.data.subset})",
        f"augment: {cfg.augment.name} (normalize {cfg.augment.normalize}), mix {_mix_name(cfg)}",
        f"optim: {cfg.optim.name}, lr {cfg.lr}, batch_size {cfg.batch_size}, epochs {cfg.epochs}, "
        f"ema {cfg.get('ema')}",
        f"sched: {cfg.sched.name}",
        f"init: {cfg.get('ckpt_path') or 'random (seed)'}",
        f"device: {device}, seed {cfg.seed}, precision {cfg.precision}, tta {cfg.tta}",
    ]
    settings = validate_pruning(cfg.prune, cfg.pruning)
    if settings.enabled:
        lines.append(
            f"prune: {settings.amount:g} (global L1, include_classifier "
            f"{settings.include_classifier}, steps {settings.steps}, finetune_epochs "
            f"{settings.finetune_epochs}, finetune_lr {settings.resolved_finetune_lr(cfg.lr):g}, "
            f"early_stop {settings.early_stop})"
        )
    if settings.curve:
        lines.append(f"pruning.curve: {', '.join(f'{a:g}' for a in settings.curve)}")
    return "\n".join(lines)


def base_results(cfg: DictConfig, params: int, device: torch.device) -> dict[str, Any]:
    """The config half of results.json: what was run."""
    return {
        "model": cfg.model.name,
        "params": params,
        "epochs": cfg.epochs,
        "early_stop": cfg.get("early_stop"),
        "ema": cfg.get("ema"),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "optimizer": cfg.optim.name,
        "seed": cfg.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": accel.resolve_precision(cfg.precision, device).name,
        "tta": cfg.tta,
        "augment": cfg.augment.name,
        "mix": cfg.mix.name if cfg.get("mix") is not None else "none",
        "sched": cfg.sched.name,
        "data": cfg.data.name,
        "val_size": cfg.data.val_size,
        "subset": cfg.data.subset,
        "prune": float(cfg.prune),
        "ckpt_path": _ckpt_path(cfg),
        "environment": environment(device),
    }


def _mix_name(cfg: DictConfig) -> str:
    """The `mix` group for the dry-run summary."""
    mix = cfg.get("mix")
    if mix is None or mix.name == "none":
        return "none"
    extra = "".join(f", {k} {mix[k]:g}" for k in ("cutmix_alpha", "switch_prob") if k in mix)
    return f"{mix.name} (alpha {mix.alpha:g}{extra}, prob {mix.prob:g})"


def _ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path` as an absolute path (results.json outlives the working directory)."""
    path = cfg.get("ckpt_path")
    return None if path is None else str(Path(path).expanduser().resolve())


def run(cfg: DictConfig, out_dir: Path | None) -> dict[str, Any]:
    """Train and evaluate one configuration; write the run folder `out_dir` (None: no files)."""
    validate(cfg)
    settings = validate_pruning(cfg.prune, cfg.pruning)
    threads = cores.set_threads(cfg.get("threads"))  # parallel sweep jobs share the cores
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    resume_from = None
    if out_dir is not None and not cfg.dry_run:
        if cfg.resume:
            resume_from, done = checkpoint.open_resume(out_dir, cfg, device)
            if done is not None:
                print(
                    f"{out_dir}: already completed (test_acc {done.get('test_acc')}); "
                    "nothing to do",
                    flush=True,
                )
                return done
        else:
            checkpoint.refuse_overwrite(out_dir)
    elif cfg.resume and not cfg.dry_run:
        raise UserError("resume=true: needs the run folder to resume (out_dir is None)")
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    # Before dry_run's summary, so that a dry run checks the file; a resumed run's weights
    # come from its state.pt instead.
    if cfg.get("ckpt_path") is not None and not cfg.resume:
        checkpoint.load_weights(model, cfg.ckpt_path)
    params = count_parameters(model)
    optimizer = _optimizer(cfg, model.parameters(), cfg.lr, device)
    augment = build_augment(cfg.augment)
    if cfg.dry_run:
        print(_summary(cfg, model, params, device), flush=True)
        print(f"layers:\n{layer_summary(model)}", flush=True)
        return {"status": "dry_run", "params": params}
    if cfg.preview:
        return _preview(cfg, augment, out_dir)

    results = base_results(cfg, params, device)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if resume_from is None:  # a resumed run keeps the record of how it was started
            atomic.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        report.write_status(out_dir, {**results, "status": "running"})
    speed = None
    try:
        speed = accel.speed_setup(model, device, cfg.precision, cfg.compile)
        results.update(
            _train(speed, cfg, model, optimizer, augment, device, out_dir, resume_from, settings)
        )
    except BaseException as exc:
        if out_dir is not None:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report.write_status(out_dir, {**results, "status": "failed", "error": message})
        raise
    finally:  # small_ops_on_one_thread leaves the count of the last module run
        torch.set_num_threads(threads)
        if speed is not None and speed.split is not None:
            speed.split.close()  # its helper thread and process end with the run
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


def load_splits(data: DictConfig) -> Splits:
    """The train/val/test splits a `data` config group entry describes."""
    return load_data(
        data.name,
        data.root,
        val_size=data.val_size,
        subset=data.subset,
        split_seed=data.split_seed,
        cache_dir=data.cache_dir,
        download=data.download,
    )


def _load(cfg: DictConfig) -> Splits:
    t_load = time.perf_counter()
    splits = load_splits(cfg.data)
    log.info(
        "data: %d train / %d val / %d test images (%.1f s)",
        len(splits.train),
        len(splits.val),
        len(splits.test),
        time.perf_counter() - t_load,
    )
    return splits


def _optimizer(
    cfg: DictConfig, params: Iterable[nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    optimizer = build_optimizer(cfg.optim, params, lr)
    cores.one_thread_steps(optimizer, device)
    return optimizer


def _preview(cfg: DictConfig, augment: Any, out_dir: Path | None) -> dict[str, Any]:
    """Write augment_preview.png: training images spread over the split, each with a few
    augmented draws (before normalization), from the run's augmentation seed."""
    images = _load(cfg).train.images
    pick = torch.linspace(0, len(images) - 1, min(PREVIEW_IMAGES, len(images))).long()
    png = preview_png(images[pick], augment, torch.Generator().manual_seed(cfg.seed + 1))
    mix = build_mix(cfg.get("mix"), num_classes=1)  # the preview draws no labels
    mix_png = None
    if mix is not None:
        rng = epoch_rng(torch.Generator().manual_seed(cfg.seed + 2))
        mix_png = grid_png(mix_preview_grid(images[pick], mix, rng))
    if out_dir is not None:
        path = Path(out_dir) / "augment_preview.png"
        atomic.write_bytes(path, png)
        print(f"augment preview: {path}", flush=True)
        if mix_png is not None:
            atomic.write_bytes(Path(out_dir) / "mix_preview.png", mix_png)
            print(f"mix preview: {Path(out_dir) / 'mix_preview.png'}", flush=True)
    return {"status": "preview"}


def _train(
    speed: accel.Speed,
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    augment: Any,
    device: torch.device,
    out_dir: Path | None,
    resume_from: checkpoint.Checkpoint | None = None,
    settings: PruningSettings | None = None,
) -> dict[str, Any]:
    settings = settings or PruningSettings()
    splits = _load(cfg)
    mean, std = normalization(cfg.augment.normalize, splits.train.images)
    net, precision, scaler = speed.net, speed.precision, speed.scaler  # `model`: save, prune
    log.info(
        "precision %s, %d CPU threads, compile %s, batches in halves %s",
        precision.name,
        torch.get_num_threads(),
        cfg.compile,
        speed.split is not None,
    )
    norm = {"device": device, "mean": mean, "std": std, "memory_format": speed.memory_format}
    mix = build_mix(cfg.get("mix"), num_classes=len(splits.classes))
    train_batches = DeviceLoader(
        splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, mix=mix, **norm
    )
    val_batches = DeviceLoader(splits.val, EVAL_BATCH_SIZE, **norm)
    test_batches = DeviceLoader(splits.test, EVAL_BATCH_SIZE, **norm)

    criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg.optim.get("label_smoothing", 0.0)))
    eval_criterion = nn.CrossEntropyLoss()
    # epochs=0 (evaluate ckpt_path) trains nothing, so it has no schedule to build.
    schedule = None
    if cfg.epochs > 0:
        schedule = build_scheduler(
            cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=len(train_batches)
        )
    has_val = len(splits.val) > 0
    # Training and the pruning stage evaluate through this one object (criterion, precision,
    # TTA), so dense and pruned rows are measured alike.
    stage_data = prune_stage.StageData(
        train=train_batches,
        val=val_batches,
        test=test_batches,
        criterion=criterion,
        eval_criterion=eval_criterion,
        has_val=has_val,
        device=device,
        autocast=precision.dtype,
        tta=cfg.tta,
        grad_clip=cfg.optim.get("grad_clip"),
        split=speed.split,
    )

    # Every random stream an epoch draws from, saved and restored with the checkpoint.
    generators = {
        "order": train_batches.order_generator,
        "augment": train_batches.augment_generator,
    }
    if mix is not None:  # only then, so that checkpoints of runs without mixing stay as they were
        generators["mix"] = train_batches.mix_generator
    # The weights evaluated, selected, tested and pruned: the model's, or their average's.
    ema = weight_average(model, cfg.ema) if cfg.get("ema") is not None else None
    evaluated = model if ema is None else ema.module
    # What state.pt holds the state of: restored from it on resume, saved into it after
    # every epoch, so the two cannot list different objects.
    stateful = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": schedule,
        "generators": generators,
        "scaler": scaler,
        "ema": ema,
    }
    loop = LoopState()
    if resume_from is not None:
        loop = checkpoint.restore(resume_from, **stateful)
        log.info("resuming after epoch %d of %d from %s", loop.epoch, cfg.epochs, resume_from.path)
        if out_dir is not None:  # files of an epoch that ran past the checkpoint are redone
            report.write_metrics(out_dir, loop.history)
        checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
    history = loop.history
    save_state = partial(checkpoint.save, out_dir, loop, cfg=cfg, device=device, **stateful)
    early_stop = cfg.get("early_stop")
    for epoch in range(loop.epoch + 1, cfg.epochs + 1):
        # Checked before each epoch rather than after, so that a run resumed from the
        # checkpoint of the epoch that spent the patience stops there too.
        if early_stop is not None and loop.epoch - loop.best_epoch >= early_stop:
            log.info(
                "early stop after epoch %d (early_stop=%d): val acc has not beaten epoch %d's %.2f",
                loop.epoch,
                early_stop,
                loop.best_epoch,
                loop.best_acc,
            )
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            train, val = stage_data.train_epoch(
                net,
                optimizer,
                scaler=scaler,
                desc=f"epoch {epoch}/{cfg.epochs}",
                step_scheduler=schedule.step_batch,
                after_step=None if ema is None else step_function(ema, model),
                eval_model=evaluated,
            )
        except NonFiniteLoss as exc:
            raise _diverged(exc, epoch, len(train_batches), loop, out_dir) from None
        schedule.step_epoch({"val_loss": val.loss, "val_acc": val.acc})
        row = {
            "epoch": epoch,
            **prune_stage.epoch_metrics(train, val),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f  val loss %.4f acc %.2f  lr %.4g  %.1f s",
            epoch,
            cfg.epochs,
            train.loss,
            train.acc,
            val.loss,
            val.acc,
            lr,
            row["seconds"],
        )
        # Without a validation split the last epoch counts as best (nothing else to select on).
        if not has_val or val.acc > loop.best_acc:
            loop.best_acc, loop.best_epoch, loop.best_state = (
                val.acc,
                epoch,
                checkpoint.cpu_state(evaluated),
            )
            checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
        loop.epoch = epoch
        if out_dir is not None:
            report.write_metrics(out_dir, history)
            checkpoint.save_weights(out_dir, checkpoint.LAST_FILE, checkpoint.cpu_state(evaluated))
            save_state()  # last: the files above are redone on resume; this says what is done

    if loop.best_state is None:  # epochs=0: the weights of ckpt_path, validated as they are
        val = stage_data.evaluate(net, val_batches)
        loop.best_acc, loop.best_state = val.acc, checkpoint.cpu_state(model)
        log.info("epochs=0: %s as it is, val acc %.2f", cfg.ckpt_path, val.acc)
        if out_dir is not None:
            report.write_metrics(out_dir, history)
        checkpoint.save_weights(out_dir, checkpoint.BEST_FILE, loop.best_state)
        # Fine-tuning in a pruning stage can take longer than the training did: with this
        # resume point at "epoch 0", an interrupted stage goes on from its own
        # prune_state.pt instead of starting again. Evaluating alone needs none.
        if settings.enabled and out_dir is not None:
            save_state()
    best_acc, best_epoch = loop.best_acc, loop.best_epoch
    # The test set is evaluated once, with the weights chosen on validation.
    model.load_state_dict(loop.best_state)
    classes = list(splits.classes)
    test = stage_data.evaluate(net, test_batches, num_classes=len(classes))
    log.info("best epoch %d (val acc %.2f): test acc %.2f", best_epoch, best_acc, test.acc)
    confusion = test.confusion.tolist() if test.confusion is not None else []
    class_acc = report.class_accuracy(classes, confusion) if confusion else {}
    log.info(
        "test acc per class: %s",
        ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in class_acc.items()),
    )
    if out_dir is not None:
        if history:
            report.plot_curves(out_dir, history, title=str(cfg.model.name))
        if confusion:
            report.write_confusion(out_dir, classes, confusion)
            report.plot_confusion(out_dir, classes, confusion, title=str(cfg.model.name))
    results = {
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "test_acc": test.acc,
        "test_loss": test.loss,
        "train_seconds": sum(r["seconds"] for r in history),
        "test_seconds": test.seconds,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "epochs_run": loop.epoch,
        "stopped_early": loop.epoch < cfg.epochs,
        "test_class_acc": class_acc,
        "batch_halves": speed.split is not None,
    }
    if not (settings.enabled or settings.curve):
        return results

    # The pruning stage starts from the weights just tested (the best epoch's) and keeps its
    # own resume point (checkpoint.STAGE_FILE), as training keeps state.pt.
    params = count_parameters(model)
    stage_resume = None
    if settings.enabled and out_dir is not None and resume_from is not None:
        stage_resume = checkpoint.load_stage(out_dir, cfg, generators)
    curve = None
    if settings.curve:
        # A stage's resume point exists only once the curve was done: it carries the rows.
        if stage_resume is not None and stage_resume.get("curve") is not None:
            curve = stage_resume["curve"]
        else:
            curve = prune_stage.run_curve(
                model,
                settings,
                stage_data,
                total_params=params,
                dense_val_acc=best_acc,
                dense_test_acc=test.acc,
            )
        results["curve"] = curve
        if out_dir is not None:
            report.write_csv(out_dir / "curve.csv", curve, prune_stage.CURVE_COLUMNS)
            report.plot_sparsity(out_dir, curve, title=str(cfg.model.name))
    if settings.enabled:
        save_stage = None
        if out_dir is not None:
            save_stage = partial(
                checkpoint.save_stage, out_dir, generators=generators, cfg=cfg, curve=curve
            )
        results.update(
            prune_stage.run_pruning(
                model,
                settings,
                stage_data,
                lambda p, lr: _optimizer(cfg, p, lr, device),
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
    exc: NonFiniteLoss, epoch: int, steps: int, loop: LoopState, out_dir: Path | None
) -> TrainingDiverged:
    if out_dir is None:
        kept = "no checkpoints are written without a run folder"
    elif loop.epoch == 0:
        kept = "no epoch finished, so there is no checkpoint"
    else:
        kept = f"the last good checkpoint ({checkpoint.STATE_FILE}) is from epoch {loop.epoch}"
    return TrainingDiverged(
        f"training diverged: loss {exc.loss} at epoch {epoch}, step {exc.step}/{steps} "
        f"(lr {exc.lr:.4g}); {kept}; try a lower lr"
    )
