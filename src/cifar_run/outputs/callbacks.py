"""Hydra callbacks (registered in conf/config.yaml under hydra.callbacks).

SweepSummary runs where the multirun started, after every job has returned, whatever the
launcher (in-process, joblib workers, SLURM nodes): it reads the job folders, so it needs
nothing from the jobs but their files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_run.outputs import sweep
from cifar_run.outputs.run_folders import load_runs
from cifar_run.outputs.summary import summarize, write_summary

log = logging.getLogger(__name__)

sweep.register_resolvers()  # job folder names; workers that unpickle this callback need it too

EXIT_JOBS_FAILED = 1


class SweepSummary(Callback):
    """At the end of a multirun: summary.csv/.md/.png in the sweep folder (and reference.md/.csv
    for an experiment that quotes its report's figures), and a non-zero exit status when a job
    failed (the sweep itself ran every job: see sweep.run_job)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = load_runs([sweep_dir])
        except ValueError as exc:
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
