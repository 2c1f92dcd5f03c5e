"""Configs of one's own outside the package (`--config-dir DIR`, `hydra.searchpath`), checked
like the package's own groups; and model-key messages that name the chosen model's keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, TEST_DATA, one_line, read_results, run_cli
from .folders import copy_classes

DATA = ["data=imagefolder", f"data.root={TEST_DATA}", "data.subset=10", "data.val_size=0.1"]
DATA += ["device=cpu"]

NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's own net: one conv, global pool, a linear layer per class."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''


@pytest.fixture
def mine(tmp_path: Path) -> dict[str, str]:
    """A config folder (model/tiny_mine.yaml, model/bad.yaml, experiment/quick.yaml) and a
    code folder with the model's class, outside the repository; returns the environment
    that puts the code on the path."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mynets.py").write_text(NET)
    conf = tmp_path / "mine"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "tiny_mine.yaml").write_text(
        "name: tiny_mine\n_target_: mynets.TinyNet\nnum_classes: null\nwidth: 8\n"
    )
    (conf / "model" / "bad.yaml").write_text(
        "name: bad\n_target_: mynets.TinyNet\nnum_classes: null\nwidht: 8\n"
    )
    (conf / "experiment" / "quick.yaml").write_text(
        textwrap.dedent(
            """\
            # @package _global_
            defaults:
              - override /model: tiny_mine
            epochs: 1
            batch_size: 32
            lr: 0.05
            """
        )
    )
    return {"PYTHONPATH": str(tmp_path / "code")}


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    return one_line(proc.stderr)


def test_experiment_and_model_of_ones_own_train_through_config_dir(
    mine: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "--config-dir", str(tmp_path / "mine"), "experiment=quick", *DATA,
        f"hydra.run.dir={run_dir}", cwd=tmp_path, env=mine,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["model"] == "tiny_mine"
    assert results["epochs"] == 1 and results["batch_size"] == 32
    assert results["params"] == (3 * 9 * 8 + 8) + (8 * 10 + 10)  # 10 classes from the data


def test_search_path_works_too_and_flags_may_come_anywhere(
    mine: dict[str, str], tmp_path: Path
) -> None:
    searched = run_cli(
        f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "model=tiny_mine", "dry_run=true",
        cwd=tmp_path, env=mine,
    )  # fmt: skip
    assert searched.returncode == 0, searched.stderr
    assert "model: tiny_mine (TinyNet)" in searched.stdout
    late = run_cli(
        "model=tiny_mine", "dry_run=true", "--config-dir", str(tmp_path / "mine"), cwd=tmp_path,
        env=mine,
    )  # fmt: skip
    assert late.returncode == 0, late.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # A key its YAML has wrong: named with the keys the model's class takes.
        (["model=bad"], "model.widht: not a key of model 'bad'; allowed: num_classes, width"),
        # A key mistyped on the command line: told the keys of this model, not LeNet-5's.
        (["model=tiny_mine", "model.widht=4"], "did you mean model.width?"),
        (["experiment=quick", "lr=-1"], "lr=-1: must be a positive number"),
        (["model=nope"], "choose one of: bad, cnn, cnn5, cnn7, lenet5,"),
        (["experiment=nope"], "choose one of: fast, quick, report000,"),
    ],
)
def test_own_configs_are_checked_like_built_in_ones(
    mine: dict[str, str], tmp_path: Path, args: list[str], expected: str
) -> None:
    proc = run_cli(
        "--config-dir", str(tmp_path / "mine"), *args, *DATA, "epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=mine,
    )  # fmt: skip
    assert expected in _one_line(proc)
    assert not (tmp_path / "run").exists()  # refused before Hydra made the folder


def test_a_config_dir_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    line = _one_line(run_cli("--config-dir", str(tmp_path / "nope"), "dry_run=true", cwd=tmp_path))
    assert line == f"cifar-run: error: --config-dir {tmp_path / 'nope'}: no such folder " + (
        "(a folder of model/*.yaml, ...)"
    )


def test_wrong_model_key_names_the_keys_of_the_model_chosen(tmp_path: Path) -> None:
    line = _one_line(run_cli("model=cnn", "model.foo=5", "dry_run=true", cwd=tmp_path))
    assert line.startswith("cifar-run: error: model.foo=5: unknown key 'model.foo'; known keys: ")
    known = line.split("known keys: ", 1)[1].split(", ")
    assert {"conv", "fc", "pool_out", "input_size", "num_classes"} <= set(known)
    added = _one_line(run_cli("model=resnet20", "+model.foo=5", "dry_run=true", cwd=tmp_path))
    assert "depths" in added and "widths" in added


def test_a_wheel_style_install_finds_its_conf_and_your_folder(
    mine: dict[str, str], tmp_path: Path
) -> None:
    # The wheel's layout: the package with conf/ inside it (pyproject.toml force-include),
    # run from a folder outside the repository with only that package on the path.
    site = tmp_path / "site"
    shutil.copytree(REPO / "src" / "cifar_run", site / "cifar_run")
    shutil.copytree(REPO / "conf", site / "cifar_run" / "conf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), mine["PYTHONPATH"]])}
    where = subprocess.run(
        [sys.executable, "-c", "import cifar_run.cli as c; print(c.CONF_DIR)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.stdout.strip() == str(site / "cifar_run" / "conf"), where.stderr
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_run", "--config-dir", "mine", "experiment=quick", *DATA,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(run_dir)["model"] == "tiny_mine"
    bad = subprocess.run(
        [sys.executable, "-m", "cifar_run", "--config-dir", "mine", "model=bad", *DATA,
         "dry_run=true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "model.widht: not a key of model 'bad'" in _one_line(bad)


def test_a_model_without_num_classes_must_fit_the_data(
    mine: dict[str, str], tmp_path: Path
) -> None:
    # TinyNet's own default is 10 outputs; its YAML here has no num_classes to fill in.
    (tmp_path / "mine" / "model" / "fixed10.yaml").write_text(
        "name: fixed10\n_target_: mynets.TinyNet\nwidth: 4\n"
    )
    root = copy_classes(tmp_path / "three", ["airplane", "cat", "ship"])
    proc = run_cli(
        "--config-dir", str(tmp_path / "mine"), "model=fixed10", "data=imagefolder",
        f"data.root={root}", "data.val_size=0.1", "dry_run=true", cwd=tmp_path, env=mine,
    )  # fmt: skip
    assert _one_line(proc) == (
        "cifar-run: error: model=fixed10: gives outputs of shape [10] per image, but the data "
        "has 3 classes; give the model's config a num_classes key (null = the data's count) "
        "that its class takes"
    )
