"""The pruning stage in-process: LeNet-5 on a few random batches, no data loading, no CLI."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from cifar_run.engine import checkpoint
from cifar_run.engine import loop as engine_loop
from cifar_run.engine.loop import LoopData
from cifar_run.models.lenet import LeNet5
from cifar_run.outputs.files import RESULT_COLUMNS
from cifar_run.prune import stage as prune_stage
from cifar_run.prune.curve import run_curve
from cifar_run.prune.masks import prune_copy
from cifar_run.prune.settings import PruningSettings

from .conftest import largest_change

CPU = torch.device("cpu")
PRUNABLE = 61770  # Conv2d/Linear weights of LeNet-5
PARAMS = 62006


def stage_data(n_batches: int = 2) -> LoopData:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n_batches)
    ]
    return LoopData(
        train=batches,
        val=batches[:1],
        test=batches[1:],
        criterion=nn.CrossEntropyLoss(),
        eval_criterion=nn.CrossEntropyLoss(),
        has_val=True,
        device=CPU,
    )


def sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def lenet() -> LeNet5:
    torch.manual_seed(0)
    return LeNet5()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_one_shot_without_finetuning(tmp_path: Path) -> None:
    model = lenet()
    settings = PruningSettings(amount=0.5)
    results = prune_stage.run_pruning(
        model, settings, stage_data(), sgd, total_params=PARAMS, finetune_lr=0.01, out_dir=tmp_path
    )
    zeros = round(0.5 * PRUNABLE)
    assert results["sparsity"] == zeros / PRUNABLE
    assert results["nonzero_params"] == PARAMS - zeros
    assert results["compression"] == pytest.approx(PARAMS / (PARAMS - zeros))
    assert "finetuned_test_acc" not in results and "pruned_test_acc" in results
    assert results["pruned_ckpt_gzip_bytes"] < results["dense_ckpt_gzip_bytes"]
    assert results["fully_pruned_layers"] == []
    assert not torch_prune.is_pruned(model)

    state = torch.load(tmp_path / "checkpoints" / "pruned.pt", weights_only=True)
    LeNet5().load_state_dict(state, strict=True)
    rows = read_csv(tmp_path / "sparsity.csv")
    assert list(rows[0]) == ["name", "shape", "weights", "zeros", "sparsity"]
    assert sum(int(r["zeros"]) for r in rows) == zeros
    assert not (tmp_path / "finetune.csv").exists()


def test_iterative_with_finetuning_keeps_masks_and_reports_both(tmp_path: Path) -> None:
    model = lenet()
    settings = PruningSettings(amount=0.6, steps=3, finetune_epochs=2)
    results = prune_stage.run_pruning(
        model, settings, stage_data(), sgd, total_params=PARAMS, finetune_lr=0.05, out_dir=tmp_path
    )
    zeros = round(0.6 * PRUNABLE)
    assert PARAMS - results["nonzero_params"] == zeros
    for key in ("pruned_val_acc", "pruned_test_acc", "finetuned_val_acc", "finetuned_test_acc"):
        assert 0 <= results[key] <= 100, key
    assert results["finetune_lr"] == 0.05 and results["pruning_steps"] == 3

    history = read_csv(tmp_path / "finetune.csv")
    assert [(r["step"], r["epoch"]) for r in history] == [
        (str(s), str(e)) for s in (1, 2, 3) for e in (0, 1, 2)
    ]
    assert [float(r["sparsity"]) for r in history[::3]] == pytest.approx([0.2, 0.4, 0.6], abs=1e-4)
    state = torch.load(tmp_path / "checkpoints" / "pruned.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight")]
    assert sum(int((w == 0).sum()) for w in weights) == zeros


@pytest.mark.parametrize("steps", [1, 2], ids=["one-shot", "iterative"])
@pytest.mark.parametrize("ema", [0.999999999, None], ids=["ema", "no-ema"])
def test_finetuning_with_ema_validates_and_keeps_the_average(
    tmp_path: Path, steps: int, ema: float | None
) -> None:
    # A decay this close to 1 holds the average at the pruned starting weights while SGD at
    # a high rate moves the model: the kept weights tell which of the two was kept. With two
    # steps, step 1's average must be what step 2 prunes further (global L1 over weights
    # that did not move prunes what one shot would).
    model = lenet()
    start = checkpoint.cpu_state(prune_copy(model, 0.5))
    settings = PruningSettings(amount=0.5, steps=steps, finetune_epochs=2)
    prune_stage.run_pruning(
        model,
        settings,
        stage_data(),
        sgd,
        total_params=PARAMS,
        finetune_lr=0.5,
        out_dir=tmp_path,
        ema=ema,
    )
    kept = torch.load(tmp_path / "checkpoints" / "pruned.pt", weights_only=True)
    zeros = sum(int((v == 0).sum()) for k, v in kept.items() if k.endswith("weight"))
    assert zeros >= round(0.5 * PRUNABLE)
    if ema is None:
        assert largest_change(kept, start) > 1e-2
    else:
        assert largest_change(kept, start) < 1e-6


@pytest.mark.parametrize(("autocast", "scaled"), [(torch.float16, True), (None, False)])
def test_fp16_finetuning_scales_the_loss(
    autocast: torch.dtype | None, scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    scalers = []
    real = engine_loop.train_one_epoch

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        scalers.append(kwargs.get("scaler"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_loop, "train_one_epoch", spy)
    data = stage_data()
    data.autocast = autocast
    settings = PruningSettings(amount=0.5, finetune_epochs=1)
    results = prune_stage.run_pruning(
        lenet(), settings, data, sgd, total_params=PARAMS, finetune_lr=0.01, out_dir=None
    )
    assert len(scalers) == 1 and 0 <= results["finetuned_test_acc"] <= 100
    assert isinstance(scalers[0], torch.amp.GradScaler) == scaled


def test_fully_pruned_layer_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10)
    )
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # the small layer goes first under a global threshold
    params = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="cifar_run.prune.stage"):
        results = prune_stage.run_pruning(
            model,
            PruningSettings(amount=0.8),  # 59 of 54 + 20 weights
            stage_data(),
            sgd,
            total_params=params,
            finetune_lr=0.01,
            out_dir=tmp_path,
        )
    assert results["fully_pruned_layers"] == ["0.weight"]
    assert "0.weight" in caplog.text and "100% pruned" in caplog.text


def test_curve_uses_copies_of_the_dense_model() -> None:
    model = lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = PruningSettings(amount=0.0, curve=(0.9, 0.3))
    rows = run_curve(
        model, settings, stage_data(), total_params=PARAMS, dense_val_acc=12.5, dense_test_acc=25.0
    )
    assert [r["amount"] for r in rows] == [0.0, 0.3, 0.9]
    assert (rows[0]["val_acc"], rows[0]["test_acc"], rows[0]["sparsity"]) == (12.5, 25.0, 0.0)
    assert [r["nonzero_params"] for r in rows[1:]] == [
        PARAMS - round(a * PRUNABLE) for a in (0.3, 0.9)
    ]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_table_rows_dense_then_pruned() -> None:
    results = {c: 1 for c in RESULT_COLUMNS}
    results.update(
        params=100,
        best_val_acc=60.0,
        test_acc=61.0,
        prune=0.5,
        sparsity=0.5,
        nonzero_params=55,
        compression=100 / 55,
        dense_sparsity=0.0,
        dense_nonzero_params=100,
        dense_ckpt_bytes=1000,
        dense_ckpt_gzip_bytes=900,
        pruned_ckpt_bytes=1000,
        pruned_ckpt_gzip_bytes=500,
        pruned_val_acc=50.0,
        pruned_test_acc=51.0,
        finetune_epochs=0,
    )
    dense, pruned = prune_stage.table_rows(results, RESULT_COLUMNS)
    assert (dense["pruned"], dense["best_val_acc"], dense["test_acc"]) == (False, 60.0, 61.0)
    assert (pruned["pruned"], pruned["best_val_acc"], pruned["test_acc"]) == (True, 50.0, 51.0)
    assert dense["ckpt_gzip_bytes"] == 900 and pruned["ckpt_gzip_bytes"] == 500

    results.update(finetuned_val_acc=58.0, finetuned_test_acc=59.0, finetune_epochs=2)
    _, pruned = prune_stage.table_rows(results, RESULT_COLUMNS)
    assert (pruned["best_val_acc"], pruned["test_acc"]) == (58.0, 59.0)
    assert pruned["finetune_epochs"] == 2
