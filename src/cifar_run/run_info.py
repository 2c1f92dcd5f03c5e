"""What a run says about its config and data: the dry-run summary, the config half of
results.json and the keys known once the data has loaded (run.py calls these; they only read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run.config.data_keys import class_count, image_size
from cifar_run.data.sources import Splits
from cifar_run.engine.precision import resolve_precision
from cifar_run.engine.reproducibility import environment
from cifar_run.models.summary import layer_summary
from cifar_run.prune.settings import validate_pruning


def summary_text(cfg: DictConfig, model: nn.Module, params: int, device: torch.device) -> str:
    side, classes = image_size(cfg.data), class_count(cfg.data)
    lines = [
        f"model: {cfg.model.name} ({type(model).__name__})",
        f"parameters: {params}",
        f"data: {cfg.data.name} (root {cfg.data.root}, val_size {cfg.data.val_size}, "
        f"subset {cfg.data.subset})",
        f"classes: {classes} (the model's outputs), images {side}x{side}",
        f"augment: {cfg.augment.name} (normalize {cfg.augment.normalize}), mix {_mix_name(cfg)}",
        f"optim: {cfg.optim.name}, lr {cfg.lr}, batch_size {cfg.batch_size}, epochs {cfg.epochs}, "
        f"ema {cfg.get('ema')}",
        f"sched: {cfg.sched.name}",
        f"init: {cfg.get('ckpt_path') or 'random (seed)'}",
        f"device: {device}, seed {cfg.seed}, precision {cfg.precision}, tta {cfg.tta}, "
        f"speed {cfg.speed.name if cfg.get('speed') is not None else 'auto'}",
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


def dry_run_text(cfg: DictConfig, model: nn.Module, params: int, device: torch.device) -> str:
    """What dry_run=true prints: the summary, then the layer table for one image of the
    data's size."""
    side = image_size(cfg.data)
    table = layer_summary(model, (1, 3, side, side))
    return f"{summary_text(cfg, model, params, device)}\nlayers:\n{table}"


def base_results(cfg: DictConfig, params: int, device: torch.device) -> dict[str, Any]:
    """The config half of results.json: what was run (and, for an experiment that quotes
    them, its report's published figures: the `reference` block, for the sweep summary)."""
    results = {
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
        "speed": cfg.speed.name if cfg.get("speed") is not None else "auto",
        "precision": resolve_precision(cfg.precision, device).name,
        "tta": cfg.tta,
        "augment": cfg.augment.name,
        "mix": cfg.mix.name if cfg.get("mix") is not None else "none",
        "sched": cfg.sched.name,
        "data": cfg.data.name,
        "subset": cfg.data.subset,
        "prune": float(cfg.prune),
        "ckpt_path": _ckpt_path(cfg),
        "environment": environment(device),
    }
    if cfg.get("reference") is not None:
        results["reference"] = OmegaConf.to_container(cfg.reference, resolve=True)
    return results


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


def data_results(
    splits: Splits, mean: Sequence[float], std: Sequence[float], memory_format: torch.memory_format
) -> dict[str, Any]:
    """What the loaded data and the batches were: results.json keys known once data loads.
    `val_size` is the count of images held out (the config's value may be a fraction)."""
    return {
        "val_size": len(splits.val),
        "classes": list(splits.classes),
        "image_size": int(splits.train.images.shape[-1]),
        "normalize_mean": [float(m) for m in mean],
        "normalize_std": [float(s) for s in std],
        "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
    }
