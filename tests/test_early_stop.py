"""early_stop: a run ends once validation accuracy has stalled for N epochs, tests the best
epoch's weights, says so in results.json, and a resume after the stop trains no further."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cifar_run.config import compare
from cifar_run.config.checks import validate
from cifar_run.errors import UserError
from cifar_run.run import run

from .conftest import TINY, compose_cfg, one_line, read_results, run_cli

# A learning rate far below fp32's resolution of the weights: every epoch scores the same on
# validation, so epoch 1 stays the best and the patience runs out on schedule.
STALLED = [*TINY, "epochs=4", "lr=1e-12", "sched=none", "precision=fp32"]


def _epochs_in_metrics(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_stalled_validation_stops_the_run_after_the_patience(tmp_path: Path) -> None:
    results = run(compose_cfg([*STALLED, "early_stop=2"]), tmp_path / "run")
    assert results["best_epoch"] == 1
    assert results["epochs_run"] == 3  # epoch 1 best, then 2 epochs without improvement
    assert results["stopped_early"] is True
    assert results["early_stop"] == 2
    assert _epochs_in_metrics(tmp_path / "run") == [1, 2, 3]
    saved = read_results(tmp_path / "run")
    assert saved["status"] == "completed" and saved["epochs_run"] == 3
    assert saved["test_acc"] == results["test_acc"]


def test_without_early_stop_every_epoch_runs(tmp_path: Path) -> None:
    results = run(compose_cfg(STALLED), tmp_path / "run")
    assert results["epochs_run"] == 4 and results["stopped_early"] is False
    assert results["early_stop"] is None
    assert _epochs_in_metrics(tmp_path / "run") == [1, 2, 3, 4]


def test_resume_after_the_stopping_epoch_trains_no_further(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(compose_cfg([*STALLED, "early_stop=1"]), run_dir)
    assert first["epochs_run"] == 2
    # As if killed after the checkpoint of epoch 2 was written, before the test pass.
    (run_dir / "results.json").write_text(json.dumps({"status": "running"}))
    metrics = (run_dir / "metrics.csv").read_text()
    again = run(compose_cfg([*STALLED, "early_stop=1", "resume=true"]), run_dir)
    assert again["epochs_run"] == 2 and again["stopped_early"] is True
    assert again["test_acc"] == first["test_acc"]
    assert (run_dir / "metrics.csv").read_text() == metrics


def test_a_run_from_before_the_key_resumes_under_its_null_default(tmp_path: Path) -> None:
    """config.yaml files written before `early_stop` existed lack the key; null is the same."""
    cfg = compose_cfg(TINY)
    saved = {k: v for k, v in compare.config_snapshot(cfg).items() if k != "early_stop"}
    assert compare.config_diff(saved, cfg) == []
    assert compare.config_diff(saved, compose_cfg([*TINY, "early_stop=3"])) == [
        "early_stop: <absent> -> 3"
    ]


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc", "true"])
def test_bad_early_stop_is_refused(value: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, f"early_stop={value}"]))
    assert str(info.value).startswith("early_stop=")


def test_early_stop_without_a_validation_split_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_cli(*TINY, "data.val_size=0", "early_stop=3", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "early_stop=3: needs a validation split" in one_line(proc.stderr)
    assert not any(tmp_path.rglob("results.json"))  # refused before any run started


# Fine-tuning as stalled as the training above: every fine-tuning epoch scores the same.
STALLED_FINETUNE = [*STALLED, "epochs=1", "prune=0.5", "pruning.finetune_lr=1e-12"]


def _finetune_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "finetune.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if int(row["epoch"]) > 0]


@pytest.mark.parametrize(
    ("overrides", "ran"),
    [
        (["pruning.early_stop=2"], 3),  # epoch 1 the best, then 2 epochs without gain
        (["pruning.early_stop=1"], 2),
        (["early_stop=1"], 5),  # the run's patience is for training alone
        ([], 5),
    ],
)
def test_the_last_fine_tuning_stops_after_its_patience(
    tmp_path: Path, overrides: list[str], ran: int
) -> None:
    results = run(
        compose_cfg([*STALLED_FINETUNE, "pruning.finetune_epochs=5", *overrides]), tmp_path / "r"
    )
    assert results["finetune_epochs_run"] == ran
    assert _finetune_epochs(tmp_path / "r") == list(range(1, ran + 1))
    assert results["finetune_epochs"] == 5  # the setting, as asked
    assert results["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_fine_tuning_between_pruning_steps_runs_every_epoch(tmp_path: Path) -> None:
    overrides = [*STALLED_FINETUNE, "pruning.finetune_epochs=4", "pruning.steps=2"]
    run(compose_cfg([*overrides, "pruning.early_stop=1"]), tmp_path / "r")
    with open(tmp_path / "r" / "finetune.csv", newline="") as f:
        rows = [(int(r["step"]), int(r["epoch"])) for r in csv.DictReader(f)]
    assert [e for s, e in rows if s == 1 and e > 0] == [1, 2, 3, 4]
    assert [e for s, e in rows if s == 2 and e > 0] == [1, 2]


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "abc"])
def test_bad_pruning_early_stop_is_refused(value: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, "prune=0.5", f"pruning.early_stop={value}"]))
    assert str(info.value).startswith(f"pruning.early_stop={value}: must be a positive integer")


def test_pruning_early_stop_without_a_validation_split_is_refused() -> None:
    overrides = [*TINY, "data.val_size=0", "prune=0.5", "pruning.finetune_epochs=2"]
    with pytest.raises(UserError, match=r"pruning.early_stop=2: needs a validation split"):
        validate(compose_cfg([*overrides, "pruning.early_stop=2"]))
    validate(compose_cfg(overrides))  # without it the same run is fine
