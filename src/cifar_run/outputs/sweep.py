"""One job of a Hydra multirun: its folder name, resume, and failure that stays inside the job.

A sweep must survive its jobs: a bad value, a NaN loss or a crash marks that job `failed` in its
results.json and the launcher moves on; the summary callback (callbacks.py) lists the failure and
sets the exit status. Rerunning the same command into the same sweep folder skips every job whose
results.json says `completed`, so an interrupted sweep picks up where it stopped (preflight.py
has refused the rerun already if such a job's config.yaml differs from this command's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_run import exits, interrupts
from cifar_run.outputs import files as report
from cifar_run.outputs import gpus

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
# Most file systems allow 255 bytes per name; a sweep over many keys must stay well below that.
MAX_JOB_DIR = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%-]+")


def job_dir_name(num: Any, override_dirname: str, max_len: int = MAX_JOB_DIR) -> str:
    """`<num>_<overrides>`: readable, safe as one path component, and the same on every rerun.

    Characters other than letters, digits and `._=,+@%-` become `_` (a `/` in a value would
    otherwise nest folders). A name longer than `max_len` is cut and ends in a hash of the
    whole, so two long names never collide and a rerun finds the same folder.
    """
    name = _UNSAFE.sub("_", f"{num}_{override_dirname}".rstrip("_"))
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9]}-{digest}"
    return name


def register_resolvers() -> None:
    """`${cifar_run.job_dir:num,override_dirname}` for hydra.sweep.subdir (conf/config.yaml)."""
    if not OmegaConf.has_resolver("cifar_run.job_dir"):
        OmegaConf.register_new_resolver("cifar_run.job_dir", job_dir_name)
    if not OmegaConf.has_resolver("cifar_run.gpu_jobs"):  # conf/hydra/launcher/parallel.yaml
        OmegaConf.register_new_resolver("cifar_run.gpu_jobs", gpus.parallel_jobs)


def read_status(out_dir: Path) -> str | None:
    """The `status` in out_dir/results.json, or None without a readable one."""
    try:
        return json.loads((Path(out_dir) / RESULTS_FILE).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_job(
    cfg: DictConfig,
    out_dir: Path,
    job_num: int,
    run: Callable[[DictConfig, Path | None], Any],
) -> str:
    """Run one sweep job; returns `completed`, `skipped`, `failed` or `dry_run`, never raises.

    KeyboardInterrupt still stops the whole sweep (run() marks the job failed on its way out).
    With device=auto on a machine with several GPUs the job gets one of its own (gpus.lease).
    """
    name = Path(out_dir).name
    if read_status(out_dir) == "completed":
        log.info("skipping completed job %s (results.json says completed)", name)
        return "skipped"
    count = gpus.gpu_count()
    with gpus.lease(str(cfg.device), Path(out_dir).parent, job_num, count) as device:
        if device != cfg.device:
            log.info(
                "job %s: on GPU %s of %d (device=%s)", name, device.split(":")[-1], count, device
            )
            with open_dict(cfg):
                cfg.device = device
        return _run(cfg, out_dir, run)


def _run(cfg: DictConfig, out_dir: Path, run: Callable[[DictConfig, Path | None], Any]) -> str:
    from cifar_run.engine import checkpoint
    from cifar_run.errors import UserError

    name = Path(out_dir).name
    if checkpoint.state_path(out_dir).exists() and not (cfg.resume or cfg.dry_run):
        # An interrupted job continues from its last finished epoch instead of starting over
        # (run() still refuses if the job's config has changed since).
        log.info("resuming interrupted job %s from its checkpoint", name)
        with open_dict(cfg):
            cfg.resume = True
    results_file = Path(out_dir) / RESULTS_FILE
    before = results_file.stat().st_mtime_ns if results_file.exists() else None
    try:
        result = run(cfg, None if cfg.dry_run else out_dir)
    except Exception as exc:
        if interrupts.pressed():  # Ctrl-C turned into another error: the sweep stops all the same
            raise KeyboardInterrupt from None
        message = one_line(exc)
        if isinstance(exc, UserError):
            log.error("job %s failed: %s", name, message)
        elif isinstance(exc, OSError):  # a full disk, no permission: the path says it all
            message = exits.os_error_line(exc)
            log.error("job %s failed: %s", name, message)
        else:  # a crash: keep the traceback in the job's log for whoever debugs it
            log.exception("job %s failed: %s", name, message)
        # A value rejected before training leaves no results.json of this attempt (none, or a
        # stale one from an earlier attempt); the summary needs this attempt's error.
        # (A dry run writes no results, but its failure is recorded too: the exit status.)
        after = results_file.stat().st_mtime_ns if results_file.exists() else None
        if after == before or read_status(out_dir) != "failed":
            try:
                report.write_status(Path(out_dir), {"status": "failed", "error": message})
            except OSError as write_error:  # the summary lists the job as not completed
                log.error("job %s: %s", name, exits.os_error_line(write_error))
        return "failed"
    return "dry_run" if cfg.dry_run else str((result or {}).get("status", "completed"))
