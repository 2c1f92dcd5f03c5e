"""The real command line, in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import platform
import re
import subprocess
from pathlib import Path

import pytest
import torch

import cifar_run
from cifar_run.models.lenet import LeNet5

from .conftest import CLI, TINY, one_line, run_cli, run_report, start


def test_dry_run_prints_the_parameter_count(tmp_path: Path) -> None:
    proc = run_cli("model=lenet5", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^parameters: 62006$", proc.stdout, re.M)
    assert not (tmp_path / "outputs").exists()  # no empty run folder left behind


def test_tiny_run_writes_every_file_of_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The end of the output: the results table and the folder it came from.
    assert proc.stdout.endswith((run_dir / "results.md").read_text() + f"run folder: {run_dir}\n")
    for name in (
        "metrics.csv",
        "results.json",
        "results.csv",
        "results.md",
        "loss.png",
        "accuracy.png",
        "config.yaml",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "confusion.csv",
        "confusion.png",
    ):
        assert (run_dir / name).is_file(), name

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    for key in (
        "model",
        "params",
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "seed",
        "device",
        "best_val_acc",
        "best_epoch",
        "test_acc",
        "train_seconds",
    ):
        assert key in results, key
    assert results["params"] == 62006 and results["epochs"] == 2 and results["device"] == "cpu"
    env = results["environment"]  # what the numbers depend on besides the config
    assert env["torch"] == torch.__version__ and env["cifar_run"] == cifar_run.__version__
    assert env["python"] == platform.python_version() and env["gpu"] is None
    assert env["torchvision"] and env["hydra"] and env["cpu"]
    assert 0 <= results["test_acc"] <= 100 and results["best_epoch"] in (1, 2)

    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds" and len(lines) == 3
    header = (run_dir / "results.md").read_text().splitlines()[0]
    assert "| model | params |" in header and "test_acc" in header
    assert (run_dir / "results.csv").read_text().count("\n") == 2

    # The test pass's confusion matrix: 10 test images per class (data.subset=10), its
    # diagonal the test_acc.
    with open(run_dir / "confusion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [row["true"] for row in rows]
    assert len(classes) == 10 and list(rows[0]) == ["true", *classes, "images", "acc"]
    assert all(sum(int(row[c]) for c in classes) == int(row["images"]) == 10 for row in rows)
    correct = sum(int(row[row["true"]]) for row in rows)
    assert results["test_acc"] == pytest.approx(100.0 * correct / 100)
    assert results["test_class_acc"] == {
        row["true"]: pytest.approx(100.0 * int(row[row["true"]]) / 10) for row in rows
    }

    for name in ("best.pt", "last.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        LeNet5().load_state_dict(state)  # strict: a plain state dict of the model
    resolved = (run_dir / "config.yaml").read_text()
    assert "batch_size: 32" in resolved and "${" not in resolved


def test_default_run_folders_are_unique(tmp_path: Path) -> None:
    for _ in range(2):
        assert run_cli(*TINY, "data.subset=2", cwd=tmp_path).returncode == 0
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 2 and all((r / "results.json").is_file() for r in runs)


BAD_INPUTS = [
    ("model=nope", "model=nope"),
    ("batch_size=0", "batch_size=0"),
    ("batch_size=-3", "batch_size=-3"),
    ("batch_size=abc", "batch_size=abc"),
    ("lr=0", "lr=0"),
    ("lr=-1", "lr=-1"),
    ("epochs=0", "epochs=0"),  # without ckpt_path there is nothing to evaluate
    ("ckpt_path=nope.pt", "ckpt_path=nope.pt"),
    ("device=tpu", "device=tpu"),
    ("data.root=/does/not/exist", "data.root=/does/not/exist"),
    ("data.val_size=60000", "data.val_size=60000"),
    ("data.subset=0", "data.subset=0"),
    ("data.strict=maybe", "data.strict=maybe"),
    ("optim=nope", "optim=nope"),
    ("sched=nope", "sched=nope"),
    ("augment=nope", "augment=nope"),
    ("seed=-1", "seed=-1"),
    ("bach_size=64", "bach_size"),
    ("prune=1.5", "prune=1.5"),
    ("prune=-0.1", "prune=-0.1"),
    ("resume=true", "resume=true"),  # a new run folder holds no checkpoint
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("device=cuda", "device=cuda"))


@pytest.mark.parametrize(("override", "named"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, override: str, named: str) -> None:
    proc = run_cli(*TINY, override, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert named in one_line(proc.stderr) and "Traceback" not in proc.stdout
    assert not list(tmp_path.rglob("results.csv"))  # nothing claims success


def test_unknown_group_option_lists_the_choices(tmp_path: Path) -> None:
    proc = run_cli("model=nope", cwd=tmp_path)
    assert "lenet5" in proc.stderr and proc.returncode == 2


def test_misspelt_key_suggests_the_right_one(tmp_path: Path) -> None:
    proc = run_cli("bach_size=64", cwd=tmp_path)
    assert "did you mean batch_size?" in proc.stderr


def test_list_of_values_without_multirun_is_refused(tmp_path: Path) -> None:
    proc = run_cli("lr=0.1,0.2", cwd=tmp_path)
    assert proc.returncode == 2 and "-m" in proc.stderr


@pytest.mark.parametrize("mode", ["--cfg", "-c", "--info"])
def test_multirun_with_a_print_mode_is_one_line_not_a_traceback(tmp_path: Path, mode: str) -> None:
    proc = run_cli("-m", "batch_size=8,16", mode, "job", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_line(proc.stderr)
    assert mode in line and "-m" in line and "Traceback" not in proc.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["hydra.run.dir=a_file/run"], "hydra.run.dir"),
        (["-m", "seed=0,1", "hydra.sweep.dir=a_file/sweep"], "hydra.sweep.dir"),
    ],
)
def test_output_folder_under_a_file_is_one_line_before_anything_runs(
    tmp_path: Path, args: list[str], key: str
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    proc = run_cli(*TINY, *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_line(proc.stderr)
    assert line.startswith(f"cifar-run: error: {key}=a_file/")
    assert "a_file is a file, not a folder" in line


def test_help_says_how_to_call_it_and_lists_every_group(tmp_path: Path) -> None:
    from cifar_run.config.compose import groups

    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("cifar-run: train, evaluate, prune and sweep CIFAR-10")
    assert "cifar-run -m KEY=V1,V2" in out and "cifar-report FOLDER" in out
    for group, options in groups().items():
        if not group.startswith("hydra"):
            assert f"\n{group}: {', '.join(sorted(options))}\n" in out, group
    assert "\nbatch_size: 64\n" in out  # the composed config follows
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("prog", ["cifar-run", "cifar-report"])
def test_version_names_the_package_and_what_it_runs_on(tmp_path: Path, prog: str) -> None:
    proc = (run_cli if prog == "cifar-run" else run_report)("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"{prog} {cifar_run.__version__} (torch {torch.__version__}, torchvision "
        f"{importlib.metadata.version('torchvision')}, hydra-core "
        f"{importlib.metadata.version('hydra-core')}, Python {platform.python_version()})\n"
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["model=resnet20", "dry_run=true"]], ids=["help", "dry_run"]
)
def test_stdout_closed_by_its_reader_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    # `cifar-run ... | head`: the reader is gone before anything is written.
    proc = start([*CLI, *args], tmp_path, stdout=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "args",
    [["lr=0.1,0.2", "dry_run=true", "-m"], ["lr=0.1,0.2", "--multirun", "dry_run=true"]],
    ids=["last", "between"],
)
def test_multirun_flag_anywhere_among_the_overrides(tmp_path: Path, args: list[str]) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\nparameters: 62006\n") == 2  # both jobs checked
    assert not (tmp_path / "outputs").exists()  # a dry run leaves no folders
