"""The Optuna study behind hydra/sweeper=optuna: kept in the sweep folder, resumable, and
failure-tolerant.

The study lives in <sweep dir>/optuna.journal (Optuna's JournalStorage: one append-only file,
no database driver). The same command into the same sweep folder continues it: finished
trials stay, a trial that a killed sweep left running runs again with its own values in its
own job folder (where the job resumes from its checkpoint), and new trials are asked for until
the study holds n_trials. Trial k is job k, in folder k_<overrides>.

A trial is worth the `metric` of its job's results.json (best_val_acc by default: chosen on
validation, never on the test set). A job that fails (a bad value, a NaN loss, a crash) is
told to the study as a failed trial, and the search goes on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_run.errors import UserError
from cifar_run.outputs import files as report
from cifar_run.outputs import locks
from cifar_run.search.settings import SearchSettings, require_optuna
from cifar_run.search.space import Space, describe, parse_space, trial_overrides

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"
STUDY_FILE = "study.csv"  # every trial: number, state, value, values, job folder
COMMAND_ATTR = "cifar_run.command"  # the study's fixed overrides and search space


class JournalLock:
    """The journal file's lock for Optuna: an flock on a file beside it. Optuna's own locks
    are files that exist while held, so a search killed while writing (SIGKILL, a power cut)
    left one behind, and the next run waited for it to go stale."""

    def __init__(self, journal: Path) -> None:
        self.path = journal.with_name(journal.name + ".flock")
        self.held: Any = None

    def acquire(self) -> bool:
        self.held = locks.acquire(self.path)
        return True

    def release(self) -> None:
        self.held.close()
        self.held = None


def open_study(settings: SearchSettings, sweep_dir: Path, space: Space) -> Any:
    """The study in the sweep folder, created or continued; refused when it belongs to
    another command (other fixed overrides or another search space)."""
    optuna = require_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(settings.storage) if settings.storage else sweep_dir / JOURNAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalLock(path) if locks.AVAILABLE else None
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        direction=settings.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != settings.direction:
        raise UserError(
            f"hydra.sweeper.direction={settings.direction}: the study {settings.study_name} in "
            f"{path} maximises or minimises the other way; choose a new hydra.sweep.dir"
        )
    command = {
        "fixed": sorted(space.fixed),
        "space": {k: repr(v) for k, v in sorted(space.distributions.items())},
    }
    saved = study.user_attrs.get(COMMAND_ATTR)
    if saved is None:
        study.set_user_attr(COMMAND_ATTR, command)
    elif saved != command:
        changed = [k for k in ("fixed", "space") if saved.get(k) != command[k]]
        raise UserError(
            f"hydra.sweep.dir={sweep_dir}: holds a study of another command (its "
            f"{' and '.join('overrides' if k == 'fixed' else 'search space' for k in changed)} "
            "differ); continue it with the same command, or choose a new hydra.sweep.dir"
        )
    # Seeded by how far the study is: a continued study draws new values, not the first again.
    done = len(study.trials)
    seed = None if settings.seed is None else settings.seed + done
    if settings.sampler == "random":
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    log.info(
        "study %s in %s: %d of %d trials so far", settings.study_name, path, done, settings.n_trials
    )
    return study


def trial_result(ret: Any, metric: str) -> tuple[float | None, str]:
    """(the trial's value, None if it failed; why it failed) from its job's results.json."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        return None, str(ret._return_value).strip().splitlines()[0] if ret._return_value else ""
    folder = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None, f"{folder.name}: no readable results.json"
    if results.get("status") != "completed":
        return None, str(results.get("error") or f"status {results.get('status')}")
    value = results.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"results.json has no {metric} (e.g. no validation split: data.val_size=0)"
    return float(value), ""


class Search:
    """One invocation of the sweeper: finish the study's trials."""

    def __init__(
        self,
        settings: SearchSettings,
        config: DictConfig,
        launcher: Any,
        validate: Callable[[Sequence[Sequence[str]]], None],
    ) -> None:
        self.settings, self.config, self.launcher = settings, config, launcher
        self.validate = validate
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def run(self, arguments: list[str]) -> Any:
        space = parse_space(self.settings.params, arguments)
        if self.config.get("dry_run") is True:
            return self._dry_run(space)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")  # what sweeps keep
        study = open_study(self.settings, self.sweep_dir, space)
        optuna = require_optuna()
        running = optuna.trial.TrialState.RUNNING
        for frozen in study.get_trials(deepcopy=False, states=(running,)):
            log.info(
                "trial %d was left running by an interrupted search: running it again",
                frozen.number,
            )
            # Its values as drawn; any a kill left undrawn are drawn now.
            trial = optuna.trial.Trial(study, frozen._trial_id)
            params = {k: trial._suggest(k, d) for k, d in space.distributions.items()}
            self._launch(study, space, [(frozen.number, params)])
        waiting = optuna.trial.TrialState.WAITING
        while True:
            started = len([t for t in study.get_trials(deepcopy=False) if t.state != waiting])
            todo = self.settings.n_trials - started
            if todo <= 0:
                break
            trials = [
                study.ask(space.distributions) for _ in range(min(todo, self.settings.n_jobs))
            ]
            self._launch(study, space, [(t.number, t.params) for t in trials])
        return self._report(study)

    def _dry_run(self, space: Space) -> None:
        """One trial's job as a dry run, its values drawn from the space, and no study kept
        (the sweep folder of a dry run is a temporary one): the jobs are checked without
        n_trials dry runs that train nothing."""
        study = require_optuna().create_study(direction=self.settings.direction)  # in memory
        overrides = [[*space.fixed, *trial_overrides(study.ask(space.distributions).params)]]
        self._check(overrides)
        self.launcher.launch(overrides, initial_job_idx=0)
        print(
            f"search: dry run of one trial; the search runs {self.settings.n_trials} trials "
            f"over {describe(space)}",
            flush=True,
        )

    def _check(self, overrides: list[list[str]]) -> None:
        try:
            self.validate(overrides)
        except Exception as exc:  # e.g. a searched key the config does not have
            raise UserError(str(exc).strip().splitlines()[0]) from None

    def _launch(self, study: Any, space: Space, trials: list[tuple[int, dict[str, Any]]]) -> None:
        """Run trials as jobs numbered like them (consecutive numbers go out together)."""
        groups: list[list[tuple[int, dict[str, Any]]]] = []
        for trial in sorted(trials):
            if groups and groups[-1][-1][0] + 1 == trial[0]:
                groups[-1].append(trial)
            else:
                groups.append([trial])
        for group in groups:
            overrides = [[*space.fixed, *trial_overrides(params)] for _, params in group]
            self._check(overrides)
            returns = self.launcher.launch(overrides, initial_job_idx=group[0][0])
            for (number, _), ret in zip(group, returns, strict=True):
                value, error = trial_result(ret, self.settings.metric)
                if value is None:
                    log.warning("trial %d failed: %s", number, error)
                    study.tell(number, state=require_optuna().trial.TrialState.FAIL)
                else:
                    study.tell(number, value)

    def _report(self, study: Any) -> Any:
        """study.csv in the sweep folder, and the best trial on the terminal."""
        metric = self.settings.metric
        rows = []
        for trial in study.get_trials(deepcopy=False):
            folder = job_folder(self.sweep_dir, trial.number)
            rows.append(
                {
                    "trial": trial.number,
                    "state": trial.state.name.lower(),
                    metric: trial.value,
                    **trial.params,
                    "run": folder.name if folder is not None else "",
                }
            )
        columns = list(dict.fromkeys(k for row in rows for k in row))
        report.write_csv(self.sweep_dir / STUDY_FILE, rows, columns)
        complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
        if not complete:
            print(f"search: no trial completed; see {self.sweep_dir / STUDY_FILE}", flush=True)
            return None
        best = study.best_trial
        values = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        )
        folder = job_folder(self.sweep_dir, best.number)
        print(
            f"best trial {best.number} of {len(rows)}: {metric} {best.value:.2f} with {values}"
            + (f" (run {folder.name})" if folder is not None else ""),
            flush=True,
        )
        return best


def job_folder(sweep_dir: Path, number: int) -> Path | None:
    """The job folder of trial `number` (`<number>` or `<number>_<overrides>`)."""
    for path in sorted(sweep_dir.glob(f"{number}*")):
        if path.is_dir() and (path.name == str(number) or path.name.startswith(f"{number}_")):
            return path
    return None


def search(
    values: Any,
    config: DictConfig,
    launcher: Any,
    arguments: list[str],
    validate: Callable[[Sequence[Sequence[str]]], None],
) -> Any:
    """The sweeper's work: check the settings, then run the study's missing trials."""
    settings = SearchSettings.from_config(values)
    require_optuna()
    return Search(settings, config, launcher, validate).run(arguments)
