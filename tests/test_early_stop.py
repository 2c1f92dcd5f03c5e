"""early_stop: a run ends once validation accuracy has stalled for N epochs, tests the best
epoch's weights, says so in results.json, and a resume after the stop trains no further."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cifar_run import checkpoint
from cifar_run.config import validate
from cifar_run.errors import UserError
from cifar_run.run import run

from .conftest import TINY, compose_cfg, read_results, run_cli

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
    saved = {k: v for k, v in checkpoint.config_snapshot(cfg).items() if k != "early_stop"}
    assert checkpoint.config_diff(saved, cfg) == []
    assert checkpoint.config_diff(saved, compose_cfg([*TINY, "early_stop=3"])) == [
        "early_stop: <absent> -> 3"
    ]


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc", "true"])
def test_bad_early_stop_is_refused(value: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, f"early_stop={value}"]))
    assert str(info.value).startswith("early_stop=")


def test_early_stop_without_a_validation_split_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_cli(*TINY, "data.val_size=0", "early_stop=3", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "early_stop=3: needs a validation split" in lines[0]
    assert not any(tmp_path.rglob("results.json"))  # refused before any run started
