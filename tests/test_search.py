"""hydra/sweeper=optuna through the real CLI: a search killed halfway continues with the same
command, a failing trial is recorded as failed, the best trial is chosen on validation."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from cifar_run.errors import UserError
from cifar_run.search.settings import SearchSettings
from cifar_run.search.space import parse_space, trial_overrides
from cifar_run.search.study import JOURNAL_FILE, STUDY_FILE

from .conftest import CLI, TINY, one_line, read_results, run_cli, start
from .test_loggers import hidden

NO_BATCH = [a for a in TINY if not a.startswith("batch_size=")]
STUDY = "cifar_optuna"  # conf/hparams_search/cifar_optuna.yaml


def search_args(sweep_dir: Path, trials: int) -> list[str]:
    """The example search on the tiny data, over a learning rate range LeNet-5 trains in."""
    return [
        "-m",
        *NO_BATCH,
        "epochs=3",  # enough for the trials' validation accuracies to differ
        "hparams_search=cifar_optuna",
        f"hydra.sweeper.n_trials={trials}",
        "lr=tag(log,interval(0.001,0.05))",  # on the command line: replaces the example's range
        f"hydra.sweep.dir={sweep_dir}",
    ]


def study_storage(sweep_dir: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL_FILE)))


def load_study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=study_storage(sweep_dir))


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()),
        key=lambda p: int(p.name.split("_")[0]),
    )


def completed(sweep_dir: Path) -> int:
    done = 0
    for job in job_dirs(sweep_dir) if sweep_dir.is_dir() else []:
        try:
            done += read_results(job)["status"] == "completed"
        except (OSError, ValueError, KeyError):
            pass
    return done


@pytest.mark.slow
def test_a_search_killed_after_three_trials_continues_to_six_and_a_failing_trial_is_recorded(
    tmp_path: Path,
) -> None:
    import optuna

    sweep_dir = tmp_path / "search"
    sweep_dir.mkdir()
    # The study's first trial is queued with a learning rate that diverges.
    queued = optuna.create_study(
        study_name=STUDY, storage=study_storage(sweep_dir), direction="maximize"
    )
    queued.enqueue_trial({"lr": 1e30})
    args = search_args(sweep_dir, trials=6)
    proc = start([*CLI, *args], tmp_path)
    deadline = time.monotonic() + 600
    while completed(sweep_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    first_done = {
        j.name: (j / "results.json").stat().st_mtime_ns
        for j in job_dirs(sweep_dir)
        if (j / "results.json").is_file() and read_results(j)["status"] == "completed"
    }
    assert len(first_done) >= 3 and len(load_study(sweep_dir).trials) < 6

    again = run_cli(*args, cwd=tmp_path, timeout=900)  # the same command
    assert again.returncode == 1, again.stderr[-3000:]  # the summary reports the failed job
    assert "1 of 6 jobs failed" in again.stderr
    study = load_study(sweep_dir)
    assert [t.number for t in study.trials] == list(range(6))
    assert [t.state.name for t in study.trials] == ["FAIL"] + ["COMPLETE"] * 5
    # The failed trial: its job diverged, the others ran.
    assert study.trials[0].params["lr"] == 1e30
    failed, *others = job_dirs(sweep_dir)
    assert read_results(failed)["status"] == "failed"
    assert "training diverged" in read_results(failed)["error"]
    assert all(read_results(j)["status"] == "completed" for j in others)
    # None repeated: six draws of the search space, six job folders, one per trial.
    draws = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(draws) == 6
    jobs = job_dirs(sweep_dir)
    assert [int(j.name.split("_")[0]) for j in jobs] == list(range(6))
    for trial, job in zip(study.trials, jobs, strict=True):
        ran = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert set(trial_overrides(trial.params)) <= set(ran)  # the trial's values, as drawn
        if trial.state.name == "COMPLETE":
            assert trial.value == read_results(job)["best_val_acc"]
    # The trials finished before the kill were not run again.
    for name, stamp in first_done.items():
        assert (sweep_dir / name / "results.json").stat().st_mtime_ns == stamp

    # The best trial is the one with the best validation accuracy, and the summary says so.
    done = [read_results(j) for j in others]
    best = study.best_trial
    assert best.number != 0 and best.value == max(r["best_val_acc"] for r in done)
    assert f"best trial {best.number} of 6: best_val_acc {best.value:.2f}" in again.stdout
    table = pd.read_csv(sweep_dir / STUDY_FILE)
    assert list(table["trial"]) == list(range(6))
    assert list(table["state"]) == ["fail"] + ["complete"] * 5
    assert math.isnan(table.loc[0, "best_val_acc"])
    assert (sweep_dir / "summary.md").read_text().count("\n| ") >= 6  # every trial's row

    # The trials ran with the default logger: steps.csv beside the usual files, nothing more.
    for job in others:
        assert (job / "steps.csv").is_file() and (job / "metrics.csv").is_file()
        assert not list(job.glob("events.out.tfevents.*")) and not (job / "mlflow.json").exists()
    assert not (tmp_path / "outputs").exists()  # no MLflow store


def test_a_search_on_the_test_set_is_refused_before_anything_runs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    proc = run_cli(*search_args(sweep_dir, 2), "hydra.sweeper.metric=test_acc", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hydra.sweeper.metric=test_acc" in one_line(proc.stderr)
    assert not list(sweep_dir.glob("*/results.json"))


def test_a_search_without_optuna_installed_names_the_extra(tmp_path: Path) -> None:
    proc = run_cli(*search_args(tmp_path / "s", 2), cwd=tmp_path, env=hidden(tmp_path, "optuna"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'pip install "cifar-run[search]"' in one_line(proc.stderr)


def test_a_search_needs_multirun(tmp_path: Path) -> None:
    proc = run_cli(*search_args(tmp_path / "s", 2)[1:], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "hparams_search=cifar_optuna" in line and "-m" in line


def test_a_mistake_every_trial_shares_is_one_line_before_any_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "s"
    proc = run_cli(*search_args(sweep_dir, 2), "data.val_size=5000", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.val_size=5000" in one_line(proc.stderr)
    assert not sweep_dir.exists()


def test_a_dry_run_of_a_search_shows_one_trial_and_keeps_no_study(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "s"
    proc = run_cli(*search_args(sweep_dir, 5), "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parameters: 62006") == 1  # one trial's model summary
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("search: dry run of one trial; the search runs 5 trials over")
    assert "lr in [0.001, 0.05] (log)" in last and "batch_size in {32, 64, 128, 256}" in last
    assert "failed" not in proc.stdout + proc.stderr
    assert not sweep_dir.exists() and not (tmp_path / "outputs").exists()


# In-process: the search space and the settings.


def test_search_space_from_config_and_command_line() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = parse_space(
        {
            "lr": "tag(log, interval(0.001, 0.3))",
            "batch_size": "choice(32, 64)",
            "optim.momentum": "interval(0.8, 0.99)",
        },
        [
            "data=imagefolder",
            "seed=range(0,3)",
            "model.width=tag(int, interval(8, 32))",
            "batch_size=16",
        ],
    )
    d = space.distributions
    assert d["lr"] == FloatDistribution(0.001, 0.3, log=True)
    assert d["optim.momentum"] == FloatDistribution(0.8, 0.99)
    assert d["seed"] == CategoricalDistribution([0, 1, 2])
    assert d["model.width"] == IntDistribution(8, 32)
    assert "batch_size" not in d  # a fixed value on the command line wins over a range
    assert space.fixed == ["data=imagefolder", "batch_size=16"]
    assert trial_overrides({"lr": 0.1234567891234, "batch_size": 64, "flag": True, "x": None}) == [
        "lr=0.1234567891234",
        "batch_size=64",
        "flag=true",
        "x=null",
    ]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lr": "tag(log, interval(0, 1))"}, "lr=interval(0, 1): needs 0 < low < high"),
        ({"lr": "tag(cube, interval(0.1, 1))"}, "lr: unknown tag cube"),
        ({"lr": "interval(1, 0.1)"}, "needs low < high"),
        ({}, "hydra.sweeper.params: no search space"),
    ],
)
def test_bad_search_spaces_are_one_line(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(params, ["data=imagefolder"])


def test_search_settings_are_checked() -> None:
    assert SearchSettings.from_config({"n_trials": 4}).n_trials == 4
    for values, key in (
        ({"n_trials": 0}, "n_trials=0"),
        ({"sampler": "grid"}, "sampler=grid"),
        ({"metric": "test_loss"}, "metric=test_loss"),
        ({"trials": 3}, "hydra.sweeper.trials: unknown key"),
    ):
        with pytest.raises(UserError, match=key):
            SearchSettings.from_config(values)


def test_a_trial_killed_while_drawing_its_values_is_completed_and_run(tmp_path: Path) -> None:
    from hydra.core.utils import JobStatus
    from omegaconf import OmegaConf

    from cifar_run.search.study import Search, open_study

    sweep_dir = tmp_path / "search"
    params = {"lr": "tag(log, interval(0.001, 0.1))", "batch_size": "choice(16, 32)"}
    settings = SearchSettings.from_config({"n_trials": 2, "study_name": "s", "params": params})
    study = open_study(settings, sweep_dir, parse_space(params, ["epochs=1"]))
    half = study.ask()  # as a kill leaves it: the trial made, one of its values drawn
    batch_size = half.suggest_categorical("batch_size", [16, 32])
    launched = []

    class Launcher:  # runs nothing: writes each job's results.json as a finished job would
        def launch(self, overrides, initial_job_idx):
            returns = []
            for i, job in enumerate(overrides):
                folder = sweep_dir / f"{initial_job_idx + i}_job"
                folder.mkdir()
                results = {"status": "completed", "best_val_acc": 50.0 + initial_job_idx}
                (folder / "results.json").write_text(json.dumps(results))
                launched.append((initial_job_idx + i, list(job)))
                output = {"hydra": {"runtime": {"output_dir": str(folder)}}}
                returns.append(
                    SimpleNamespace(status=JobStatus.COMPLETED, hydra_cfg=OmegaConf.create(output))
                )
            return returns

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    best = Search(settings, config, Launcher(), lambda batch: None).run(["epochs=1"])
    assert [number for number, _ in launched] == [0, 1]  # the half-drawn trial first, as job 0
    first = launched[0][1]
    assert first[0] == "epochs=1" and f"batch_size={batch_size}" in first
    assert any(o.startswith("lr=") for o in first)  # drawn now
    trials = open_study(settings, sweep_dir, parse_space(params, ["epochs=1"])).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t.value for t in trials] == [50.0, 51.0] and best.number == 1
