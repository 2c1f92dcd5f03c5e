"""Whether a run folder fits a config: resuming the run in it, or refusing to overwrite it.

A resume continues only under a config that gives the numbers the run would have given
(config.compare); a fresh run never writes over another run's checkpoint or results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cifar_run.config.compare import config_diff
from cifar_run.engine.checkpoint import STATE_FILE, Checkpoint, load, state_path
from cifar_run.errors import CheckpointError, UserError


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


def open_run_folder(
    cfg: DictConfig, out_dir: Path | None, device: torch.device
) -> tuple[Checkpoint | None, dict[str, Any] | None]:
    """For a run into `out_dir` (None: no files): (the checkpoint to resume from, the results
    of a run completed already), after the checks that refuse to resume or to overwrite."""
    if cfg.dry_run:
        return None, None
    if out_dir is None:
        if cfg.resume:
            raise UserError("resume=true: needs the run folder to resume (out_dir is None)")
        return None, None
    if not cfg.resume:
        refuse_overwrite(out_dir)
        return None, None
    resume_from, done = open_resume(out_dir, cfg, device)
    if done is not None:
        print(
            f"{out_dir}: already completed (test_acc {done.get('test_acc')}); nothing to do",
            flush=True,
        )
    return resume_from, done
