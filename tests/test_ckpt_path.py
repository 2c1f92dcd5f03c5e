"""ckpt_path: a run starts from saved weights; with epochs=0 it only evaluates (and prunes)
them. Bad files and mismatched models are one-line errors before any data loads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from cifar_run.config import compare
from cifar_run.config.checks import validate
from cifar_run.engine import checkpoint
from cifar_run.errors import UserError
from cifar_run.models import build_model
from cifar_run.run import run

from .conftest import TINY, compose_cfg, one_line, read_results, run_cli

FP32 = [*TINY, "precision=fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished 2-epoch LeNet-5 run: its folder and results."""
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, run(compose_cfg([*FP32, "epochs=2"]), out)


def test_epochs_0_tests_the_checkpoint_as_the_original_run_did(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    source, first = trained
    best = source / "checkpoints" / "best.pt"
    again = run(compose_cfg([*FP32, "epochs=0", f"ckpt_path={best}"]), tmp_path / "eval")
    # The same weights on the same splits: the original's selection and test numbers.
    assert again["test_acc"] == first["test_acc"]
    assert again["test_loss"] == first["test_loss"]
    assert again["best_val_acc"] == first["best_val_acc"]
    assert again["best_epoch"] == 0 and again["epochs_run"] == 0
    assert again["final_train_acc"] is None and again["train_seconds"] == 0
    saved = read_results(tmp_path / "eval")
    assert saved["status"] == "completed"
    assert saved["ckpt_path"] == str(best.resolve())
    with open(tmp_path / "eval" / "metrics.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []  # the header only: no epoch ran
    assert not (tmp_path / "eval" / "loss.png").exists()
    # Nothing to resume without a pruning stage (tests/test_prune_resume.py has one).
    assert not checkpoint.state_path(tmp_path / "eval").exists()
    tested = torch.load(tmp_path / "eval" / "checkpoints" / "best.pt", weights_only=True)
    original = torch.load(best, weights_only=True)
    assert all(torch.equal(tested[k], original[k]) for k in original)


def test_training_starts_from_the_checkpoint(trained: tuple[Path, dict], tmp_path: Path) -> None:
    source, first = trained
    # An lr far below fp32's resolution leaves the weights as loaded, so validation scores
    # them exactly as the source run's best epoch; from a fresh init it would not.
    stalled = [*FP32, "lr=1e-12", "sched=none"]
    best = source / "checkpoints" / "best.pt"
    resumed = run(compose_cfg([*stalled, f"ckpt_path={best}"]), tmp_path / "from")
    assert resumed["best_val_acc"] == first["best_val_acc"]
    assert resumed["test_acc"] == first["test_acc"]
    scratch = run(compose_cfg(stalled), tmp_path / "scratch")
    assert resumed["ckpt_path"] is not None and scratch["ckpt_path"] is None
    weights = torch.load(tmp_path / "from" / "checkpoints" / "last.pt", weights_only=True)
    loaded = torch.load(best, weights_only=True)
    assert all(torch.equal(weights[k], loaded[k]) for k in loaded)
    fresh = torch.load(tmp_path / "scratch" / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.equal(fresh["features.0.weight"], loaded["features.0.weight"])


def test_state_pt_gives_its_current_weights(trained: tuple[Path, dict]) -> None:
    source, _ = trained
    model = build_model(compose_cfg(TINY).model)
    checkpoint.load_weights(model, source / "checkpoints" / "state.pt")
    last = torch.load(source / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())


def test_epochs_0_with_pruning_prunes_the_loaded_weights(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    source, first = trained
    best = source / "checkpoints" / "best.pt"
    results = run(
        compose_cfg([*FP32, "epochs=0", f"ckpt_path={best}", "prune=0.5"]), tmp_path / "pruned"
    )
    assert results["test_acc"] == first["test_acc"]  # the dense row is the checkpoint
    assert results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [row["pruned"] for row in results["rows"]] == [False, True]
    assert (tmp_path / "pruned" / "checkpoints" / "pruned.pt").exists()


def test_a_checkpoint_of_another_model_is_one_line_exit_2(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    source, _ = trained
    best = source / "checkpoints" / "best.pt"
    proc = run_cli(*TINY, "model=resnet20", f"ckpt_path={best}", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"cifar-run: error: ckpt_path={best}: does not fit this model")
    assert "missing: " in line and "unexpected: " in line


def test_a_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    model = build_model(compose_cfg(TINY).model)
    state = model.state_dict()
    state["classifier.5.weight"] = torch.zeros(5, 84)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"shape: classifier\.5\.weight \[5, 84\] in the file"):
        checkpoint.load_weights(model, tmp_path / "wrong.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a checkpoint", "cannot read it as a state dict"), (None, "not a state dict")],
)
def test_unreadable_files_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "file.pt"
    if content is None:
        torch.save([torch.zeros(1)], path)  # a torch file, but a list
    else:
        path.write_bytes(content)
    model = build_model(compose_cfg(TINY).model)
    with pytest.raises(UserError, match=message):
        checkpoint.load_weights(model, path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs=0"], "epochs=0: trains nothing, so it needs weights to evaluate"),
        (["ckpt_path=missing.pt"], "ckpt_path=missing.pt: no such file"),
        (["ckpt_path=."], "ckpt_path=.: is a folder, not a file"),
        (["epochs=-1"], "epochs=-1: must be an integer >= 0"),
    ],
)
def test_bad_ckpt_path_or_epochs_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, *overrides]))
    assert str(info.value).startswith(message)


def test_resume_compares_ckpt_path_as_the_file_it_names(
    trained: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = trained
    best = source / "checkpoints" / "best.pt"
    saved = compare.config_snapshot(compose_cfg([*TINY, f"ckpt_path={best}"]))
    monkeypatch.chdir(source)
    relative = compose_cfg([*TINY, "ckpt_path=checkpoints/best.pt"])
    assert compare.config_diff(saved, relative, saved_cwd="/") == []
    other = compose_cfg([*TINY, "ckpt_path=checkpoints/last.pt"])
    assert compare.config_diff(saved, other, saved_cwd="/") != []


def test_without_a_validation_split_results_json_is_strict_json(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    """No validation split: best_val_acc is NaN in Python and null in the file, which any
    JSON reader (not just Python's, which accepts NaN) can parse."""
    source, first = trained
    best = source / "checkpoints" / "best.pt"
    overrides = [*FP32, "data.val_size=0", "epochs=0", f"ckpt_path={best}"]
    results = run(compose_cfg(overrides), tmp_path / "r")
    assert math.isnan(results["best_val_acc"])

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    saved = json.loads((tmp_path / "r" / "results.json").read_text(), parse_constant=refuse)
    assert saved["best_val_acc"] is None and saved["test_acc"] == first["test_acc"]


def test_resume_does_not_need_the_starting_file(trained: tuple[Path, dict], tmp_path: Path) -> None:
    """The weights of a resumed run come from its state.pt, so the file it started from may
    have been moved or deleted since."""
    source, _ = trained
    start = tmp_path / "start.pt"
    start.write_bytes((source / "checkpoints" / "best.pt").read_bytes())
    overrides = [*FP32, "epochs=2", f"ckpt_path={start}"]
    first = run(compose_cfg(overrides), tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text('{"status": "running"}')  # as if killed
    start.unlink()
    again = run(compose_cfg([*overrides, "resume=true"]), tmp_path / "run")
    assert again["test_acc"] == first["test_acc"] and again["epochs_run"] == 2
    with pytest.raises(UserError, match="no such file"):  # a new run still needs it
        validate(compose_cfg(overrides))
