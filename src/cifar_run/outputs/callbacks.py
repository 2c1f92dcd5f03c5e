"""Hydra callbacks (registered in conf/config.yaml under hydra.callbacks).

FolderLock runs in the process that starts the run or sweep, before Hydra writes into its
folder. SweepSummary runs where the multirun started, after every job has returned, whatever
the launcher (in-process, joblib workers, SLURM nodes): it reads the job folders, so it needs
nothing from the jobs but their files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cifar_run import exits
from cifar_run.errors import UserError
from cifar_run.outputs import folder_lock, sweep
from cifar_run.outputs.run_folders import load_runs
from cifar_run.outputs.summary import summarize, write_summary

log = logging.getLogger(__name__)

sweep.register_resolvers()  # job folder names; workers that unpickle this callback need it too

EXIT_JOBS_FAILED = 1


class FolderLock(Callback):
    """Locks the run folder (hydra.run.dir) or the sweep folder (hydra.sweep.dir) for this
    process before Hydra writes into it (.hydra/, the log), so that a second cifar-run into
    the same folder is refused before it touches anything (outputs/folder_lock.py)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _lock(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _lock(config, "hydra.sweep.dir")
        # What Ctrl-C's line names, also where the jobs run in other processes (joblib).
        exits.where.sweep_dir, exits.where.dry_run = str(folder), bool(config.get("dry_run"))


def _lock(config: DictConfig, key: str) -> Path:
    # Hydra caches ${now:...} per config, so the folder resolved here is the one it makes.
    try:
        folder = Path(str(OmegaConf.select(config, key)))
    except Exception as exc:  # e.g. an interpolation of a key that does not exist
        text = str(exc).strip()
        exits.fail(f"{key}: cannot be resolved ({text.splitlines()[0] if text else exc!r})")
    try:
        folder_lock.acquire(folder, key)
    except UserError as exc:  # Hydra would turn an exception here into a warning and go on
        exits.fail(str(exc))
    except OSError as exc:
        exits.fail(exits.os_error_line(exc), status=exits.EXIT_OS_ERROR)
    return folder


class SweepSummary(Callback):
    """At the end of a multirun: summary.csv/.md/.png in the sweep folder (and reference.md/.csv
    for an experiment that quotes its report's figures), and a non-zero exit status when a job
    failed (the sweep itself ran every job: see sweep.run_job)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = load_runs([sweep_dir])
        except ValueError as exc:
            if not config.get("dry_run"):  # a dry run's jobs write results.json only on failure
                log.warning("no summary: %s", exc)
            return
        if config.get("dry_run"):
            # Dry runs print their own summary and leave results.json only when they fail.
            failed = [r for r in runs if r.status == "failed"]
            # (the sweep folder of a dry run is a temporary one, gone after the sweep: cli.py)
            self._exit_if_failed(failed, len(runs), "the job errors above")
            return
        failed = [r for r in runs if r.status != "completed"]
        try:
            summary = summarize(runs)
            write_summary(summary, sweep_dir)
            print(summary.markdown(), flush=True)
            for line in summary.selection():
                print(line, flush=True)
            reference = summary.reference_markdown()
            if reference is not None:  # ours beside the report's figures: reference.md
                print(f"\n{reference}", end="", flush=True)
            log.info("sweep summary: %s", sweep_dir / "summary.md")
        except OSError as exc:  # a full disk: one line, the jobs' results are safe
            log.error(
                "could not write the sweep summary (%s); `cifar-report %s` retries",
                exits.os_error_line(exc),
                sweep_dir,
            )
        except Exception:  # the sweep's results are safe in its job folders; say so loudly
            log.exception("could not write the sweep summary; `cifar-report %s` retries", sweep_dir)
        self._exit_if_failed(failed, len(runs), str(sweep_dir / "summary.md"))

    @staticmethod
    def _exit_if_failed(failed: list, total: int, see: str) -> None:
        if not failed:
            return
        names = ", ".join(r.path.name for r in failed[:3]) + (", ..." if len(failed) > 3 else "")
        print(
            f"cifar-run: {len(failed)} of {total} jobs failed ({names}); see {see}",
            file=sys.stderr,
            flush=True,
        )
        # Hydra turns exceptions raised in callbacks into warnings; SystemExit passes through.
        raise SystemExit(EXIT_JOBS_FAILED)
