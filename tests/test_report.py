"""`cifar-report` and the summary tables on run folders written by the real writers, and the
experiment configs of the reference reports."""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cifar_run.config.compose import CONF_DIR
from cifar_run.outputs import files as report
from cifar_run.outputs.run_folders import load_runs
from cifar_run.outputs.summary import summarize

from .conftest import REPORT, compose_cfg, one_line, run_cli, run_report, start
from .test_sweep import PNG_MAGIC


def make_run(
    folder: Path,
    overrides: list[str],
    test_acc: float | None,
    rows: list[dict] | None = None,
    val_acc: float | None = None,
    **extra: object,
) -> Path:
    """A run folder as cifar-run leaves it (results via report.write_results)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    values = dict(o.split("=", 1) for o in overrides)
    results = {
        "model": values.get("model", "lenet5"),
        "params": 62006,
        "epochs": 2,
        "batch_size": int(values.get("batch_size", 64)),
        "lr": float(values.get("lr", 0.01)),
        "optimizer": "sgd",
        "seed": int(values.get("seed", 0)),
        "device": "cpu",
        **extra,
    }
    if test_acc is None:
        report.write_status(folder, {**results, "status": "failed", "error": "loss is NaN"})
        return folder
    val_acc = test_acc + 1 if val_acc is None else val_acc
    results.update(best_val_acc=val_acc, best_epoch=2, test_acc=test_acc, train_seconds=3.0)
    results["status"] = "completed"
    report.write_results(folder, results, rows=rows)
    report.write_metrics(
        folder,
        [
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "train_acc": 20.0 * e,
                "val_loss": 2.1 / e,
                "val_acc": 19.0 * e,
                "lr": 0.01,
                "seconds": 1.5,
            }
            for e in (1, 2)
        ],
    )
    return folder


def make_sweep(folder: Path, task: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    return folder


ACCS = {(0, 0.01): 50.0, (1, 0.01): 54.0, (2, 0.01): 55.0, (0, 0.1): 60.0, (1, 0.1): 61.0}


@pytest.fixture
def seed_sweep(tmp_path: Path) -> Path:
    """seed=0,1,2 x lr=0.01,0.1 where the last job failed."""
    folder = make_sweep(tmp_path / "sweep", ["epochs=2", "seed=0,1,2", "lr=0.01,0.1"])
    num = 0
    for seed in (0, 1, 2):
        for lr in (0.01, 0.1):
            name = f"{num}_epochs=2,lr={lr},seed={seed}"
            make_run(folder / name, ["epochs=2", f"seed={seed}", f"lr={lr}"], ACCS.get((seed, lr)))
            num += 1
    return folder


def test_report_on_a_seed_sweep_adds_mean_and_std_over_seeds(seed_sweep: Path) -> None:
    proc = run_report(str(seed_sweep), cwd=seed_sweep.parent)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(seed_sweep / "summary.csv")
    assert list(table.columns[:2]) == ["seed", "lr"] and len(table) == 6
    failed = table[table["status"] == "failed"]
    assert len(failed) == 1 and failed.iloc[0]["error"] == "loss is NaN"

    seeds = pd.read_csv(seed_sweep / "summary_seeds.csv").set_index("lr")
    low = [ACCS[(s, 0.01)] for s in (0, 1, 2)]
    assert seeds.loc[0.01, "seeds"] == 3 and seeds.loc[0.1, "seeds"] == 2  # failed job left out
    assert seeds.loc[0.01, "test_acc_mean"] == pytest.approx(statistics.mean(low))
    assert seeds.loc[0.01, "test_acc_std"] == pytest.approx(statistics.stdev(low))
    assert seeds.loc[0.1, "test_acc_mean"] == pytest.approx(60.5)
    assert {"best_val_acc_mean", "best_val_acc_std"} <= set(seeds.columns)

    out = proc.stdout
    assert out.startswith("| seed | lr |") and "| failed |" in out and "loss is NaN" in out
    assert "over seeds" in out and "| lr | seeds | best_val_acc_mean |" in out
    assert "53.00" in out  # mean of 50, 54, 55 with two decimals
    for name in ("summary.md", "summary_seeds.md"):
        assert (seed_sweep / name).read_text() in out
    assert (seed_sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC


def test_selection_is_made_on_validation_and_reports_its_test_accuracy(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1,1.0"])
    # lr=0.1 has the best test accuracy, lr=0.01 the best validation accuracy.
    for num, (lr, val, test) in enumerate(
        [(0.01, 58.0, 50.0), (0.1, 52.0, 60.0), (1.0, 57.0, 55.0)]
    ):
        make_run(sweep_dir / f"{num}_lr={lr}", [f"lr={lr}"], test, val_acc=val)
    proc = run_report(str(sweep_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = "selected on validation: lr=0.01 (run 0_lr=0.01): val 58.00%, test 50.00%"
    assert line in proc.stdout.splitlines()
    assert (sweep_dir / "summary.md").read_text().rstrip().endswith(line)


def test_selection_says_when_validation_ties(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1,1.0"])
    for num, (lr, val) in enumerate([(0.01, 50.0), (0.1, 55.0), (1.0, 55.0)]):
        make_run(sweep_dir / f"{num}_lr={lr}", [f"lr={lr}"], 40.0 + num, val_acc=val)
    (line,) = summarize(load_runs([sweep_dir])).selection()
    assert line.startswith("selected on validation: lr=0.1 (run 1_lr=0.1): val 55.00%")
    assert line.endswith("; tied on validation with 1 other(s), the first is named")


def test_selection_over_seeds_takes_the_best_mean(seed_sweep: Path) -> None:
    proc = run_report(str(seed_sweep), cwd=seed_sweep.parent)
    assert proc.returncode == 0, proc.stderr
    # validation = test + 1 in make_run: lr=0.1 averages 61.5 over its 2 completed seeds
    assert (
        "selected on validation: lr=0.1, mean of 2 seeds: val 61.50% (sd 0.71), "
        "test 60.50% (sd 0.71)"
    ) in proc.stdout


def test_selection_is_made_per_kind_of_row(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1"])
    # Dense: lr=0.1 validates better; pruned: lr=0.01 does.
    vals = {(0.01, False): 60.0, (0.01, True): 59.0, (0.1, False): 62.0, (0.1, True): 55.0}
    for num, lr in enumerate((0.01, 0.1)):
        base = {"model": "lenet5", "params": 62006, "lr": lr, "seed": 0}
        rows = [
            {**base, "pruned": p, "best_val_acc": vals[(lr, p)], "test_acc": vals[(lr, p)] - 2}
            for p in (False, True)
        ]
        make_run(sweep_dir / f"{num}_lr={lr}", [f"lr={lr}"], 60.0, rows=rows)
    lines = summarize(load_runs([sweep_dir])).selection()
    assert lines == [
        "selected on validation (pruned=False): lr=0.1 (run 1_lr=0.1): val 62.00%, test 60.00%",
        "selected on validation (pruned=True): lr=0.01 (run 0_lr=0.01): val 59.00%, test 57.00%",
    ]


def test_several_sweeps_at_once(seed_sweep: Path, tmp_path: Path) -> None:
    other = make_sweep(tmp_path / "other", ["batch_size=32,64"])
    make_run(other / "0_batch_size=32", ["batch_size=32"], 40.0)
    make_run(other / "1_batch_size=64", ["batch_size=64"], 42.0)
    proc = run_report(str(seed_sweep), str(other), "--out", str(tmp_path / "both"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "both" / "summary.csv")
    assert len(table) == 8 and list(table.columns[:3]) == ["seed", "lr", "batch_size"]
    assert {"0_batch_size=32", "0_epochs=2,lr=0.01,seed=0"} <= set(table["run"])

    again = shutil.copytree(seed_sweep, tmp_path / "again")  # the same job names twice
    proc = run_report(str(seed_sweep), str(again), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| sweep/0_epochs=2,lr=0.01,seed=0 |" in proc.stdout
    assert "| again/0_epochs=2,lr=0.01,seed=0 |" in proc.stdout


def test_pruned_rows_of_a_run_are_all_in_the_table(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1"])
    for num, lr in enumerate((0.01, 0.1)):
        base = {"model": "lenet5", "params": 62006, "lr": lr, "seed": 0}
        rows = [
            {**base, "pruned": False, "sparsity": 0.0, "test_acc": 60.0 + num},
            {**base, "pruned": True, "sparsity": 0.5, "test_acc": 58.0 + num},
        ]
        make_run(
            sweep_dir / f"{num}_lr={lr}", [f"lr={lr}"], 60.0 + num, rows=rows, pruned_test_acc=58.0
        )
    summary = summarize(load_runs([sweep_dir]))
    table = summary.table
    assert len(table) == 4 and summary.label_columns == ["pruned"]
    assert table[table["pruned"]]["test_acc"].tolist() == [58.0, 59.0]
    assert "| pruned | sparsity |" in summary.markdown().splitlines()[0]


def test_a_job_folder_without_results_is_listed_as_missing(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1"])
    make_run(sweep_dir / "0_lr=0.01", ["lr=0.01"], 50.0)
    (sweep_dir / "1_lr=0.1" / ".hydra").mkdir(parents=True)  # killed before results.json
    (sweep_dir / "1_lr=0.1" / ".hydra" / "overrides.yaml").write_text("- lr=0.1\n")
    summary = summarize(load_runs([sweep_dir]))
    assert summary.table["status"].tolist() == ["completed", "missing"]
    assert summary.table["lr"].tolist() == [0.01, 0.1]
    assert [r.path.name for r in summary.failed] == ["1_lr=0.1"]


def test_runs_without_overrides_take_the_key_from_their_config(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ["lr=0.5"], 30.0)
    b = make_run(tmp_path / "b", [], 31.0)
    (b / "config.yaml").write_text("lr: 0.01\nmodel:\n  name: lenet5\n")
    table = summarize(load_runs([a, b])).table
    assert table["lr"].tolist() == [0.5, 0.01]


@pytest.mark.parametrize("make", ["empty", "no-runs", "missing"])
def test_report_on_a_folder_without_runs_exits_2_with_one_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "target"
    if make != "missing":
        target.mkdir()
    if make == "no-runs":
        (target / "notes.txt").write_text("not a run\n")
        (target / "sub").mkdir()
    proc = run_report(str(target), cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(target) in line
    assert ("no such folder" if make == "missing" else "expected a run folder") in line
    assert proc.stdout == "" and not list(tmp_path.rglob("summary.*"))


# The experiment configs: one per reference report.

EXPERIMENTS = {
    "report000": {"epochs": 10, "lr": 0.0153, "batch_size": 64, "prune": 0.5},
    "report001": {"epochs": 100, "lr": 0.01, "batch_size": 64},
    "report002": {"epochs": 20, "lr": 0.0005, "batch_size": 60},
    "report003": {"epochs": 50, "lr": 0.1, "batch_size": 128},
    "report004": {"epochs": 100, "lr": 0.01, "batch_size": 64},
}


def test_every_report_has_an_experiment_config() -> None:
    files = sorted(p.stem for p in (CONF_DIR / "experiment").glob("report*.yaml"))
    assert files == sorted(EXPERIMENTS)
    for name in files:
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and f"seeds/{name[-3:]}_" in text


def _available(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_sets_the_reports_values(name: str) -> None:
    """Compose each experiment; options another branch adds are swapped for existing ones."""
    text = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())
    swaps = []
    for entry in text["defaults"]:
        [(key, option)] = entry.items()
        group = key.split("/")[-1]
        if option not in _available(group):
            swaps.append(f"{group}={sorted(_available(group))[0]}")
    cfg = compose_cfg([f"experiment={name}", *swaps])
    for key, value in EXPERIMENTS[name].items():
        assert cfg[key] == value, key
    if name == "report000":
        assert cfg.data.val_size == 10000 and cfg.optim.momentum == 0.6
        assert cfg.sched.name == "none" and cfg.augment.name == "none"
    # The command line still wins over the experiment.
    assert compose_cfg([f"experiment={name}", *swaps, "lr=0.5"]).lr == 0.5


def test_report000_runs_as_configured(tmp_path: Path) -> None:
    proc = run_cli("experiment=report000", "prune=0", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr 0.0153, batch_size 64, epochs 10" in proc.stdout
    assert "sched: none" in proc.stdout and "val_size 10000" in proc.stdout


def test_report_writes_its_files_even_when_stdout_is_closed(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path / "sweep", ["lr=0.01,0.1"])
    for num, lr in enumerate((0.01, 0.1)):
        make_run(sweep_dir / f"{num}_lr={lr}", [f"lr={lr}"], 50.0 + num)
    proc = start([*REPORT, "sweep"], tmp_path, stdout=subprocess.PIPE)
    proc.stdout.close()  # `cifar-report sweep | head`, the reader gone at once
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err
    assert {p.name for p in sweep_dir.glob("summary.*")} == {
        "summary.csv",
        "summary.md",
        "summary.png",
    }
