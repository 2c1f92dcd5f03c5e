"""experiment=fast: Page's ResNet-9 recipe composes as documented, trains, and its benchmark
scripts run (bench_fast.py, and bench_airbench.py's data for airbench). Its GPU figures,
against airbench on the same machine, are in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cifar_run.data import sources as data
from cifar_run.engine.optim import build_optimizer, build_scheduler
from cifar_run.models import build_model

from .conftest import REPO, TEST_DATA, compose_cfg, run_cli, run_script

SMALL = [  # the committed images, a narrow net, one epoch: seconds on a CPU
    "data=imagefolder",
    f"data.root={TEST_DATA}",
    "data.subset=10",
    "model.widths=[8,16,16,32]",
    "batch_size=32",
    "epochs=1",
    "device=cpu",
]


def test_fast_composes_pages_recipe() -> None:
    cfg = compose_cfg(["experiment=fast"])
    assert cfg.model.name == "resnet9_page" and cfg.tta == "flip"
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (24, 512, 0.4)
    assert cfg.data.val_size == 0  # a fixed recipe: train on all 50k, test once
    assert cfg.augment.name == "cutout" and cfg.augment.padding_mode == "reflect"
    assert cfg.optim.nesterov and cfg.optim.label_smoothing == 0.2
    assert cfg.sched.name == "onecycle" and not cfg.sched.cycle_momentum
    assert compose_cfg(["experiment=fast", "epochs=12"]).epochs == 12  # the command line wins


def test_fast_schedule_peaks_after_five_of_24_epochs_and_ends_near_zero() -> None:
    cfg = compose_cfg(["experiment=fast"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    steps = 10
    schedule = build_scheduler(cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=steps)
    lrs = []
    for _ in range(cfg.epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step_batch()
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert abs(peak - 5 * steps) <= 1 and lrs[peak] == pytest.approx(0.4, rel=1e-3)
    assert lrs[0] < 1e-3 and lrs[-1] < 5e-3
    assert optimizer.param_groups[0]["momentum"] == 0.9  # not cycled


def test_fast_trains_with_flip_tta_on_the_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli("experiment=fast", *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["model"] == "resnet9_page"
    assert results["tta"] == "flip" and results["val_size"] == 0
    assert results["test_seconds"] > 0 and 0 <= results["test_acc"] <= 100
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert "layer3.1.res2.0.weight" in state  # Page's net, saved as a plain state dict


def test_bench_fast_reports_mean_accuracy_and_seconds(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "CIFAR_RUN_CACHE": str(tmp_path / "cache")}
    proc = run_script("bench_fast.py", "--runs", "2", *SMALL, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warm-up: 1 epoch(s)" in proc.stdout
    assert "run 1 seed 0: test acc" in proc.stdout and "run 2 seed 1: test acc" in proc.stdout
    assert "2 runs: mean test acc" in proc.stdout and "(training + final test pass)" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # nothing written: out_dir=None


def _bench_airbench():  # noqa: ANN202 (a module loaded from scripts/)
    spec = importlib.util.spec_from_file_location(
        "bench_airbench", REPO / "scripts" / "bench_airbench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airbench_gets_our_pixels_in_its_layout(tmp_path: Path) -> None:
    # airbench's CifarLoader reads uint8 NHWC images, int64 labels and class names.
    overrides = ["data=imagefolder", f"data.root={TEST_DATA}", "data.val_size=0.1"]
    _bench_airbench().write_airbench_data(overrides, tmp_path)
    ours = data.load_imagefolder(TEST_DATA)
    for name, split in (("train", ours[0]), ("test", ours[1])):
        saved = torch.load(tmp_path / "cifar10" / f"{name}.pt", weights_only=True)
        assert saved["images"].shape == (len(split.labels), 32, 32, 3)  # every image: no val split
        assert torch.equal(saved["images"], split.images.permute(0, 2, 3, 1))
        assert torch.equal(saved["labels"], split.labels)
        assert saved["classes"] == ours[2]


def test_airbench_bench_without_airbench_is_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "airbench"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow")}
    proc = run_script("bench_airbench.py", "--runs", "1", *SMALL, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (
        "bench_airbench.py: needs the airbench package (pip install airbench)"
    ), proc.stderr
