"""Full-state checkpoints: `checkpoints/state.pt` lets an interrupted run continue bit for bit.

Written atomically at the end of every epoch (temp file, fsync, rename), so a crash at any
instant leaves the previous one intact. It holds tensors and plain containers only and is
read with `torch.load(..., weights_only=True)`: model, optimizer, scheduler, grad scaler,
the loop state (epoch, history rows, best accuracy and weights), every RNG state including
the data order and augmentation generators, and the resolved config with its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

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

# Keys that cannot change a run's numbers, so a resume may differ in them: the resume switch
# itself, where the decode cache lives, whether downloading is allowed, Hydra's own settings.
# `device` is compared by kind (cpu / cuda) in `check_config`, not by spelling: `auto`,
# `cuda` and `cuda:1` may resume each other's runs, CPU and CUDA may not.
IGNORED_KEYS = (
    "resume",
    "dry_run",
    "keep_state",
    "device",
    "data.cache_dir",
    "data.download",
    "hydra",
)


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


# ---------------------------------------------------------------------------------------------
# The config a checkpoint belongs to


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED_KEYS)


def config_snapshot(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as flat `dotted.key: value` pairs that affect the results."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {k: v for k, v in sorted(_flatten(container).items()) if not _ignored(k)}


# Keys added after runs were written whose default is not null, at that default: it changes
# nothing, so a saved config without the key and a current one with it compare as equal.
LATER_DEFAULTS = {"mix.name": "none", "optim.decay_norm_and_bias": True}


def _as_if_absent(key: str, value: Any) -> bool:
    """A null, or a later key at its default: the same as a config without the key."""
    return value is None or (key in LATER_DEFAULTS and LATER_DEFAULTS[key] == value)


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A hash of what config_diff compares: equal hashes for configs it finds no difference
    in (e.g. the prune_state.pt of a run written before a key was added)."""
    kept = {k: v for k, v in config_snapshot(cfg).items() if not _as_if_absent(k, v)}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Keys naming a folder or file, relative to the working directory of the command that set them.
PATH_KEYS = ("data.root", "ckpt_path")


def _folder(path: str, cwd: str) -> str:
    return os.path.realpath(os.path.join(cwd, os.path.expanduser(path)))


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], saved_cwd: str | None = None
) -> list[str]:
    """`key: saved -> current` for every result-affecting key that differs. A key set to
    null counts as absent, so a key added later with a null default (`early_stop`) does not
    set apart the runs of configs written before it; nor does one at its LATER_DEFAULTS value.

    With `saved_cwd`, the working directory of the run that wrote `saved`, path keys are
    compared as the folders they name (`tests/data` there and its absolute path here agree);
    without it, as written."""
    old, new = config_snapshot(saved), config_snapshot(current)
    if saved_cwd is not None:
        for key in PATH_KEYS:
            was, now = old.get(key), new.get(key)
            if isinstance(was, str) and isinstance(now, str):
                if _folder(was, saved_cwd) == _folder(now, os.getcwd()):
                    old[key] = now
    for snapshot in (old, new):
        for key in [k for k in LATER_DEFAULTS if k in snapshot]:
            if _as_if_absent(key, snapshot[key]):
                del snapshot[key]
    absent = "<absent>"
    return [
        f"{k}: {old.get(k, absent)} -> {new.get(k, absent)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def check_config(ckpt: Checkpoint, cfg: DictConfig, device: torch.device) -> None:
    """Refuse to resume under a config that would give other numbers than the original."""
    differences = config_diff(ckpt.data["config"], cfg, ckpt.data.get("cwd"))
    saved_device = torch.device(ckpt.data.get("device", "cpu"))
    if saved_device.type != device.type:
        differences.append(f"device: {saved_device.type} -> {device.type}")
    _refuse_differences(ckpt.path, differences)


def _refuse_differences(path: Path, differences: list[str]) -> None:
    if differences:
        raise CheckpointError(
            f"resume=true: {path} belongs to another config ({'; '.join(differences)}); "
            "resume with the run's own overrides (its config.yaml), or start a new run"
        )


# ---------------------------------------------------------------------------------------------
# Saving, loading, restoring


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


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read(path: Path, remedy: str) -> dict[str, Any]:
    """A cifar-run checkpoint file as a dict; anything unreadable is a one-line
    CheckpointError naming the file and `remedy`."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation and corruption surface as many exception types
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, it is truncated or corrupt ({_reason(exc)}); "
            f"{remedy}"
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
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, truncated, or holding arbitrary objects
        raise UserError(
            f"ckpt_path={path}: cannot read it as a state dict (not a file torch.save wrote, "
            "truncated, or holding objects other than tensors)"
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


def open_for_resume(out_dir: str | Path, cfg: DictConfig, device: torch.device) -> Checkpoint:
    """The checkpoint of the run in `out_dir`, checked against `cfg` (`resume=true`)."""
    path = state_path(out_dir)
    if not path.exists():
        raise CheckpointError(
            f"resume=true: no checkpoint in {out_dir} ({STATE_FILE} is missing); "
            "resume needs the folder of an interrupted run: hydra.run.dir=<run folder>"
        )
    ckpt = load(path)
    check_config(ckpt, cfg, device)
    return ckpt


def open_resume(
    out_dir: str | Path, cfg: DictConfig, device: torch.device
) -> tuple[Checkpoint | None, dict[str, Any] | None]:
    """`resume=true`: (the checkpoint to continue from, None), or (None, its results) when
    the run in `out_dir` has completed already. Either way checked against `cfg`: from
    state.pt, or from config.yaml when keep_state=false has removed state.pt."""
    done = completed_results(out_dir)
    if done is None or state_path(out_dir).exists():
        ckpt = open_for_resume(out_dir, cfg, device)
        return (ckpt, None) if done is None else (None, done)
    _refuse_differences(Path(out_dir) / "config.yaml", run_config_diff(out_dir, cfg))
    return None, done


def run_config_diff(out_dir: str | Path, cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """config_diff between the config.yaml a run wrote into `out_dir` and `cfg`; empty when
    there is no readable config.yaml (nothing to compare with). Paths are compared as folders
    when Hydra's record of the run (.hydra/hydra.yaml) names its working directory."""
    try:
        record = OmegaConf.to_container(OmegaConf.load(Path(out_dir) / "config.yaml"))
    except Exception:  # missing, or not YAML OmegaConf can read
        return []
    return config_diff(record, cfg, _hydra_cwd(out_dir))


def _hydra_cwd(out_dir: str | Path) -> str | None:
    """hydra.runtime.cwd of the run in `out_dir`, if Hydra wrote its record there."""
    try:
        cwd = OmegaConf.load(Path(out_dir) / ".hydra" / "hydra.yaml").hydra.runtime.cwd
    except Exception:  # no record (hydra.output_subdir=null, or a run made without Hydra)
        return None
    return cwd if isinstance(cwd, str) else None


def refuse_overwrite(out_dir: str | Path) -> None:
    """A fresh run must not overwrite another run's checkpoint or results (a completed run
    with keep_state=false has results.json but no state.pt)."""
    if state_path(out_dir).exists():
        raise UserError(
            f"hydra.run.dir={out_dir}: already holds a run ({STATE_FILE}); add resume=true to "
            "continue it, or choose another folder"
        )
    if completed_results(out_dir) is not None:
        raise UserError(
            f"hydra.run.dir={out_dir}: already holds a completed run (results.json); "
            "choose another folder"
        )


def completed_results(out_dir: str | Path) -> dict[str, Any] | None:
    """results.json of a completed run in `out_dir`, else None."""
    try:
        results = json.loads((Path(out_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("status") == "completed" else None


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
