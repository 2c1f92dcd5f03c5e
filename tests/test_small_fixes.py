"""Things a new user trips on: a dry run that writes or submits, multistep milestones that do
not fit short runs, fractional epoch ticks and empty legend entries, results.json's
val_size and memory format."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from cifar_run.config.checks import validate
from cifar_run.engine.optim import build_scheduler, milestone_epochs
from cifar_run.errors import UserError
from cifar_run.outputs import files as report
from cifar_run.run import run

from .conftest import TINY, compose_cfg, read_results, run_cli


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_a_dry_run_creates_no_folder_even_where_one_is_named(
    tmp_path: Path, multirun: bool
) -> None:
    named = tmp_path / "named"
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = ["-m", "lr=0.01,0.02"] if multirun else []
    proc = run_cli(*args, "dry_run=true", f"{key}={named}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parameters: 62006") == (2 if multirun else 1)
    assert not named.exists() and not (tmp_path / "outputs").exists()


def test_a_dry_run_never_submits_to_a_launcher(tmp_path: Path) -> None:
    # hydra-submitit-launcher is not installed here: a dry run that used the launcher would
    # fail on it; one that submits on a cluster would queue jobs that do nothing.
    proc = run_cli(
        "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "dry_run=true",
        "lr=0.01,0.02", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parameters: 62006") == 2
    assert "dry run: hydra/launcher=slurm hydra.launcher.partition=gpu not used" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_multistep_milestones_fit_any_run_length_by_default() -> None:
    assert milestone_epochs([0.5, 0.75], 10) == [5, 8]
    assert milestone_epochs([0.5, 0.75], 1) == [1, 1]
    assert milestone_epochs([3, 6], 10) == [3, 6]  # the absolute form as it was
    for epochs in (1, 2, 3, 7):
        cfg = compose_cfg([*TINY, "sched=multistep", f"epochs={epochs}"])
        validate(cfg)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = build_scheduler(cfg.sched, opt, epochs=epochs, steps_per_epoch=3)
        lrs = []
        for _ in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step_epoch({})
        expected = [
            0.1 ** sum(e >= m for m in milestone_epochs([0.5, 0.75], epochs)) for e in range(epochs)
        ]
        assert lrs == pytest.approx(expected), epochs


@pytest.mark.parametrize(
    ("milestones", "named"),
    [("[0.5,2]", "sched.milestones=[0.5, 2]"), ("[1.5]", "sched.milestones=[1.5]")],
)
def test_milestones_mixing_forms_or_past_the_run_are_refused(milestones: str, named: str) -> None:
    cfg = compose_cfg([*TINY, "epochs=10", "sched=multistep", f"sched.milestones={milestones}"])
    with pytest.raises(UserError, match="^" + re.escape(f"{named}: must be a list of epochs")):
        validate(cfg)


def _figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    saved: dict[str, object] = {}
    monkeypatch.setattr(
        report.atomic, "save_figure", lambda fig, path: saved.update({Path(path).name: fig})
    )
    return saved


@pytest.mark.parametrize("val", [True, False], ids=["with_val", "val_size_0"])
def test_curves_have_whole_epoch_ticks_and_no_empty_legend_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, val: bool
) -> None:
    saved = _figures(monkeypatch)
    nan = float("nan")
    rows = [
        {"epoch": e, "train_loss": 2.0 / e, "train_acc": 10.0 * e}
        | {"val_loss": 2.1 / e if val else nan, "val_acc": 9.0 * e if val else nan}
        for e in (1, 2, 3)
    ]
    report.plot_curves(tmp_path, rows, title="t")
    assert set(saved) == {"loss.png", "accuracy.png"}
    for fig in saved.values():
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == (["train", "validation"] if val else ["train"])
        left, right = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if left <= t <= right]
        assert ticks and all(math.isclose(t, round(t)) for t in ticks), ticks


def test_results_say_the_images_held_out_and_the_memory_format(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(run_dir)
    assert results["val_size"] == 10  # data.val_size=0.1 of the 100 images of data.subset=10
    assert results["memory_format"] in ("channels_last", "contiguous")
    log = (run_dir / "cifar-run.log").read_text()
    assert f"memory format {results['memory_format']}" in log
    # speed=plain's "contiguous": tests/test_owndata.py's runs.


class CrashesInTraining(torch.nn.Module):
    """A model that takes the data's images at dry-run check time and fails its first
    training step, after the data has loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("simulated crash")
        return self.fc(x.mean((2, 3)))


def test_a_run_failing_after_the_data_loaded_records_what_was_held_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cifar_run.run.build_model", lambda cfg: CrashesInTraining())
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(TINY), tmp_path / "run")
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and results["error"] == "simulated crash"
    assert results["val_size"] == 10 and len(results["classes"]) == 10
    assert results["image_size"] == 32
    assert results["memory_format"] in ("channels_last", "contiguous")


@pytest.mark.parametrize("classes", [3, 12, 100])
def test_confusion_figure_stays_on_a_screen_at_any_class_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, classes: int
) -> None:
    saved = _figures(monkeypatch)
    names = [f"class {i}" for i in range(classes)]
    confusion = [[(i + j) % 3 for j in range(classes)] for i in range(classes)]
    report.plot_confusion(tmp_path, names, confusion, title="t")
    fig = saved["confusion.png"]
    width, height = fig.get_size_inches()
    assert width <= 1 + report.CONFUSION_MAX_INCHES and height <= 1 + report.CONFUSION_MAX_INCHES
    ax = fig.axes[0]
    numbers = len(ax.texts)
    assert numbers == (classes * classes if classes <= report.CONFUSION_NUMBERS else 0)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
