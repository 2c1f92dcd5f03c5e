"""Full-state checkpoints: `checkpoints/state.pt` lets an interrupted run continue bit for bit.

Written atomically at the end of every epoch (temp file, fsync, rename), so a crash at any
instant leaves the previous one intact. It holds tensors and plain containers only and is
read with `torch.load(..., weights_only=True)`: model, optimizer, scheduler, grad scaler,
the loop state (epoch, history rows, best accuracy and weights), every RNG state including
the data order and augmentation generators, and the resolved config with its hash.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_run.config.compare import config_hash
from cifar_run.engine.ema import averaged_weights
from cifar_run.engine.loop import LoopState, cpu_state
from cifar_run.engine.reproducibility import rng_state, set_rng_state
from cifar_run.errors import CheckpointError, UserError
from cifar_run.outputs import atomic

STATE_FILE = Path("checkpoints") / "state.pt"
# Plain state dicts of the weights: the ones selected on validation, and the last epoch's.
BEST_FILE = Path("checkpoints") / "best.pt"
LAST_FILE = Path("checkpoints") / "last.pt"
# The pruning stage's resume point: masked weights, fine-tuning optimizer, rows so far.
# Removed when the run completes.
STAGE_FILE = Path("checkpoints") / "prune_state.pt"
FORMAT = 1
_REQUIRED = ("epoch", "history", "best", "model", "optimizer", "scheduler", "rng", "config")


@dataclass
class Checkpoint:
    path: Path
    data: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.data["epoch"])


def state_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_FILE


def save_weights(out_dir: str | Path | None, file: Path, state: Mapping[str, torch.Tensor]) -> None:
    """A state dict into `out_dir / file` (BEST_FILE, LAST_FILE), atomically; a run without
    a folder (out_dir None) keeps nothing."""
    if out_dir is not None:
        atomic.torch_save(dict(state), Path(out_dir) / file)


def save(
    out_dir: str | Path,
    loop: LoopState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
    cfg: DictConfig,
    device: torch.device,
    scaler: Any = None,
    ema: nn.Module | None = None,
) -> None:
    """Write `checkpoints/state.pt` atomically: everything needed to run the next epoch.
    With `ema` (the run's weight average) the best weights are the average's."""
    # While the current weights are the best, storing them twice would double the file.
    best_is_model = loop.best_epoch == loop.epoch
    payload = {
        "format": FORMAT,
        "epoch": loop.epoch,
        "history": loop.history,
        "best": {
            "acc": loop.best_acc,
            "epoch": loop.best_epoch,
            "state": None if best_is_model else loop.best_state,
        },
        "model": cpu_state(model),
        "ema": cpu_state(ema) if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(generators),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "device": str(device),
        "cwd": os.getcwd(),  # what relative paths in the config are relative to
    }
    atomic.torch_save(payload, state_path(out_dir))


def _reason(exc: BaseException | Warning) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class _NotLoaded(Exception):
    """torch.load refused a file; the message is one line, torch's warnings folded in."""


def _refusal(exc: Exception, caught: list[warnings.WarningMessage]) -> str:
    text = str(exc)
    # The weights-only loader's own advice (weights_only=False) is not an option here; its
    # line naming what it refused is the part that helps.
    refused = [line.strip() for line in text.splitlines() if "Unsupported" in line]
    reason = refused[0] if "Weights only load failed" in text and refused else _reason(exc)
    notes = [_reason(w.message).split(". ")[0] for w in caught]
    return "; ".join([reason, *(f"torch warned: {n}" for n in dict.fromkeys(notes))])


def _load_file(path: Path) -> Any:
    """torch.load(weights_only=True) of `path`. torch's warnings are held back while it
    loads (some refusals come after a warning of several lines): warned again when the file
    loads, folded into the one line of `_NotLoaded` when it does not."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncation and corruption surface as many exception types
            raise _NotLoaded(_refusal(exc, caught)) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return data


def _read(path: Path, remedy: str) -> dict[str, Any]:
    """A cifar-run checkpoint file as a dict; anything unreadable is a one-line
    CheckpointError naming the file and `remedy`."""
    try:
        data = _load_file(path)
    except _NotLoaded as exc:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, it is truncated or corrupt ({exc}); {remedy}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cifar-run checkpoint (format {FORMAT} expected)")
    return data


def load(path: str | Path) -> Checkpoint:
    """Read a state.pt; anything unreadable is a one-line CheckpointError naming the file."""
    path = Path(path)
    data = _read(path, "nothing was changed: restore the file or start a new run")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return Checkpoint(path, data)


def stage_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / STAGE_FILE


def save_stage(
    out_dir: str | Path,
    payload: dict[str, Any],
    *,
    generators: Mapping[str, torch.Generator],
    cfg: DictConfig,
    curve: list[dict[str, Any]] | None = None,
) -> None:
    """Write the pruning stage's resume point atomically, with every random state (the
    fine-tuning draws from the same streams as training) and the `pruning.curve` rows
    computed before the stage, which a resume then takes instead of evaluating again."""
    full = {
        **payload,
        "curve": curve,
        "format": FORMAT,
        "rng": rng_state(generators),
        "config_hash": config_hash(cfg),
    }
    atomic.torch_save(full, stage_path(out_dir))


def load_stage(
    out_dir: str | Path, cfg: DictConfig, generators: Mapping[str, torch.Generator]
) -> dict[str, Any] | None:
    """The pruning stage's resume point in `out_dir`, random states restored; None when the
    run stopped before the stage wrote one."""
    path = stage_path(out_dir)
    if not path.exists():
        return None
    data = _read(path, "delete it to redo the pruning stage from best.pt")
    if data.get("config_hash") != config_hash(cfg):
        raise CheckpointError(
            f"{path}: belongs to another config; delete it to redo the pruning stage"
        )
    set_rng_state(data["rng"], generators)
    return data


def load_weights(model: nn.Module, path: str | Path) -> None:
    """`ckpt_path`: load a state dict into `model` (strictly, every key and shape). Takes
    best.pt / last.pt / pruned.pt (plain state dicts) and state.pt (its "model"); anything
    else is a one-line UserError naming the key, the file and what did not fit."""
    path = Path(path).expanduser()
    try:
        data = _load_file(path)
    except _NotLoaded as exc:  # not a torch file, truncated, or holding arbitrary objects
        raise UserError(
            f"ckpt_path={path}: cannot read it as a state dict (not a file torch.save wrote, "
            f"truncated, or holding objects other than tensors: {exc})"
        ) from None
    if isinstance(data, dict) and data.get("format") == FORMAT and "model" in data:
        data = data["model"]  # a full-state checkpoint: its current weights
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(
            f"ckpt_path={path}: not a state dict (a mapping of names to tensors), e.g. a run's "
            "checkpoints/best.pt"
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in data]
    unexpected = [k for k in data if k not in expected]
    shapes = [
        f"{k} {list(data[k].shape)} in the file, {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in data and data[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(
            f"ckpt_path={path}: does not fit this model ({'; '.join(problems)}); "
            "was it saved from another model= ?"
        )
    model.load_state_dict(data)


def restore(
    ckpt: Checkpoint,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
    scaler: Any = None,
    ema: nn.Module | None = None,
) -> LoopState:
    """Load every state into the freshly built objects; return the loop state to continue."""
    data = ckpt.data
    try:
        model.load_state_dict(data["model"])
        current = data["model"]  # the weights evaluated: the model's, or its average's
        if ema is not None:
            ema.load_state_dict(data["ema"])
            current = averaged_weights(data["ema"])
        optimizer.load_state_dict(data["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(data["scheduler"])
        if scaler is not None and data.get("scaler") is not None:
            scaler.load_state_dict(data["scaler"])
        set_rng_state(data["rng"], generators)
        best = data["best"]
        loop = LoopState(
            epoch=int(data["epoch"]),
            history=list(data["history"]),
            best_acc=float(best["acc"]),
            best_epoch=int(best["epoch"]),
            best_state=best["state"] if best["state"] is not None else dict(current),
        )
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{ckpt.path}: the checkpoint does not fit this run ({_reason(exc)})"
        ) from None
    return loop
