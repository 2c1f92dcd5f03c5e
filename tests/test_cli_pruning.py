"""`cifar-run prune=...` through the real command line, on the committed image subset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_run.data.augment import normalization
from cifar_run.data.loader import DeviceLoader
from cifar_run.data.sources import load_data
from cifar_run.engine.loop import evaluate
from cifar_run.models.lenet import LeNet5

from .conftest import TEST_DATA, TINY, one_line, run_cli

PRUNED_KEYS = (
    "prune",
    "sparsity",
    "params",
    "nonzero_params",
    "compression",
    "pruned_val_acc",
    "pruned_test_acc",
    "dense_ckpt_bytes",
    "dense_ckpt_gzip_bytes",
    "pruned_ckpt_bytes",
    "pruned_ckpt_gzip_bytes",
    "fully_pruned_layers",
)


def prunable_zeros(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(zeros, weights) over the Conv2d/Linear weights of a LeNet-5 state dict."""
    zeros = total = 0
    for name, module in LeNet5().named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            w = state[f"{name}.weight"]
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros, total


def test_accuracy(state: dict[str, torch.Tensor], cache_dir: Path) -> float:
    """Test accuracy of a LeNet-5 state dict on TINY's test split, as the run evaluates it."""
    splits = load_data(
        "imagefolder", TEST_DATA, val_size=0.1, subset=10, split_seed=0, cache_dir=cache_dir
    )
    mean, std = normalization("cifar", splits.train.images)
    batches = DeviceLoader(splits.test, 1000, device=torch.device("cpu"), mean=mean, std=std)
    model = LeNet5()
    model.load_state_dict(state, strict=True)
    return evaluate(model, batches, nn.CrossEntropyLoss(), device=torch.device("cpu")).acc


test_accuracy.__test__ = False  # a helper, not a test


def test_prune_half_writes_pruned_checkpoint_and_two_rows(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "model=lenet5", "prune=0.5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoints/pruned.pt", "checkpoints/best.pt", "sparsity.csv", "results.md"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "curve.csv").exists() and not (run_dir / "finetune.csv").exists()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    for key in PRUNED_KEYS:
        assert key in results, key
    assert "finetuned_test_acc" not in results

    state = torch.load(run_dir / "checkpoints" / "pruned.pt", weights_only=True)
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    zeros, total = prunable_zeros(state)
    assert abs(zeros / total - 0.5) <= 0.001
    assert results["nonzero_params"] == results["params"] - zeros
    assert results["sparsity"] == pytest.approx(zeros / total)
    assert results["compression"] == pytest.approx(results["params"] / results["nonzero_params"])
    # The checkpoint is the model that was evaluated: same accuracy from a fresh LeNet-5.
    assert test_accuracy(state, cache_dir) == results["pruned_test_acc"]
    # The dense row is the best epoch's weights, as tested before pruning.
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert test_accuracy(best, cache_dir) == results["test_acc"]

    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["pruned"] for r in rows] == ["False", "True"]
    assert float(rows[0]["test_acc"]) == results["test_acc"]
    assert float(rows[1]["test_acc"]) == results["pruned_test_acc"]
    assert int(rows[1]["nonzero_params"]) == results["nonzero_params"]
    header = (run_dir / "results.md").read_text().splitlines()[0]
    assert "| pruned |" in header and "sparsity" in header

    with (run_dir / "sparsity.csv").open() as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == 5 and sum(int(r["zeros"]) for r in layers) == zeros


@pytest.mark.slow
def test_finetune_steps_and_curve(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY,
        "prune=0.5",
        "pruning.finetune_epochs=1",
        "pruning.steps=2",
        "pruning.curve=[0.3,0.99]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("finetuned_val_acc", "finetuned_test_acc", "pruned_test_acc"):
        assert 0 <= results[key] <= 100, key
    assert results["finetune_lr"] == pytest.approx(results["lr"] / 10)

    state = torch.load(run_dir / "checkpoints" / "pruned.pt", weights_only=True)
    zeros, total = prunable_zeros(state)
    assert zeros == round(0.5 * total)
    assert test_accuracy(state, cache_dir) == results["finetuned_test_acc"]

    with (run_dir / "curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [float(r["amount"]) for r in curve] == [0.0, 0.3, 0.99]
    assert float(curve[0]["test_acc"]) == results["test_acc"]  # same trained weights
    # At 99% a global threshold empties LeNet-5's big, small-weight layers: named, not hidden.
    assert curve[2]["fully_pruned_layers"]
    assert "100% pruned" in proc.stderr + proc.stdout
    assert (run_dir / "sparsity.png").stat().st_size > 1000
    with (run_dir / "finetune.csv").open() as f:
        steps = [(r["step"], r["epoch"]) for r in csv.DictReader(f)]
    assert steps == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]


BAD_PRUNING = [
    ("prune=1.5", "prune=1.5: must be a number in [0, 1)"),
    ("prune=-0.1", "prune=-0.1: must be a number in [0, 1)"),
    ("prune=abc", "prune=abc: must be a number in [0, 1)"),
    ("prune=1", "prune=1: must be a number in [0, 1)"),
    ("pruning.curve=[0.3,1.5]", "pruning.curve=[0.3, 1.5]"),
    ("pruning.curve=[-0.2]", "pruning.curve=[-0.2]"),
    ("pruning.steps=0", "pruning.steps=0"),
    ("pruning.finetune_epochs=-1", "pruning.finetune_epochs=-1"),
    ("pruning.finetune_lr=0", "pruning.finetune_lr=0"),
]


@pytest.mark.parametrize(("override", "named"), BAD_PRUNING, ids=[b[0] for b in BAD_PRUNING])
def test_bad_pruning_input_is_one_line_and_exit_status_2(
    tmp_path: Path, override: str, named: str
) -> None:
    proc = run_cli(*TINY, override, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert named in one_line(proc.stderr) and "Traceback" not in proc.stdout
    assert not list(tmp_path.rglob("results.json"))  # stopped before the run started


def test_empty_layer_selection_fails_before_data_loads(tmp_path: Path) -> None:
    # A CNN without conv or hidden FC layers: its only Linear is the classifier, left dense.
    proc = run_cli(
        *TINY,
        "prune=0.5",
        "model=cnn",
        "model.conv=[]",
        "model.fc=[]",
        "pruning.include_classifier=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_line(proc.stderr)
    assert "pruning.include_classifier: selects no Conv2d/Linear weight" in line
    assert not list(tmp_path.rglob("results.json"))
