"""The pruning stage keeps a resume point: a run that stops during fine-tuning continues at
the pruning step and epoch where it stopped, to the numbers of a run never interrupted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cifar_run.engine import checkpoint
from cifar_run.engine.reproducibility import set_deterministic
from cifar_run.errors import CheckpointError
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run

from .conftest import TINY, compose_cfg, read_results
from .test_resume import Faulty

STEPS_PER_EPOCH = 3  # TINY: 90 training images at batch size 32
# One training epoch, then two pruning steps with 3 fine-tuning epochs each: training
# forward passes 1-3 train, 4-12 fine-tune step 1, 13-21 fine-tune step 2.
STAGED = [
    *TINY,
    "epochs=1",
    "augment=standard",
    "deterministic=true",
    "prune=0.5",
    "pruning.steps=2",
    "pruning.finetune_epochs=3",
]
FORWARDS = STEPS_PER_EPOCH * 7


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    set_deterministic(False)  # run() with deterministic=true switches it on process-wide


def _run_with(
    at: int, run_dir: Path, overrides: list[str], mp: pytest.MonkeyPatch
) -> tuple[dict, Faulty]:
    """run() with a Faulty model built where run() builds its model (after seeding, so with
    the weights a plain run gets); returns the results and the model."""
    built: list[Faulty] = []

    def build(cfg: object) -> Faulty:
        built.append(Faulty(at, "crash"))
        return built[-1]

    with mp.context() as m:
        m.setattr("cifar_run.run.build_model", build)
        return run(compose_cfg(overrides), run_dir), built[0]


def _finetune_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "finetune.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(compose_cfg(STAGED), run_dir)
    set_deterministic(False)
    return run_dir


@pytest.mark.parametrize(
    ("crash_at", "step", "epochs_done"),
    [(3 + 5, 1, 1), (12 + 5, 2, 1), (12 + 1, 2, 0)],
    ids=["step1-epoch2", "step2-epoch2", "step2-epoch1"],
)
def test_a_stage_stopped_in_fine_tuning_resumes_where_it_stopped(
    straight: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: int,
    step: int,
    epochs_done: int,
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(crash_at, run_dir, STAGED, monkeypatch)
    assert read_results(run_dir)["status"] == "failed"
    point = torch.load(checkpoint.stage_path(run_dir), weights_only=True)
    assert point["step"] == step
    assert (point["finetune"] or {"epoch": 0})["epoch"] == epochs_done

    # at=-1 never faults: the model only counts its training forward passes.
    resumed, counting = _run_with(-1, run_dir, [*STAGED, "resume=true"], monkeypatch)
    # Only what was left ran: the stopped step's remaining epochs and any later step.
    remaining = FORWARDS - STEPS_PER_EPOCH * (1 + 3 * (step - 1) + epochs_done)
    assert counting.calls == remaining

    _assert_same_stage(resumed, run_dir, straight)


def _assert_same_stage(resumed: dict, run_dir: Path, straight: Path) -> None:
    expected = read_results(straight)
    for key in ("test_acc", "pruned_val_acc", "pruned_test_acc", "finetuned_val_acc"):
        assert resumed[key] == expected[key], key
    assert resumed["finetuned_test_acc"] == expected["finetuned_test_acc"]
    assert _finetune_rows(run_dir) == _finetune_rows(straight)
    mine = torch.load(run_dir / "checkpoints" / "pruned.pt", weights_only=True)
    theirs = torch.load(straight / "checkpoints" / "pruned.pt", weights_only=True)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert read_results(run_dir)["status"] == "completed"
    assert not checkpoint.stage_path(run_dir).exists()  # a completed run no longer needs it


def test_fine_tuning_with_ema_resumes_its_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped in step 2's second fine-tuning epoch: the average of that fine-tuning comes
    # back with the resume point, so validation and the kept weights match a straight run.
    args = [*STAGED, "ema=0.5"]
    straight = tmp_path / "straight"
    run(compose_cfg(args), straight)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(12 + 5, run_dir, args, monkeypatch)
    point = torch.load(checkpoint.stage_path(run_dir), weights_only=True)
    assert point["step"] == 2 and point["finetune"]["ema"] is not None
    resumed, _ = _run_with(-1, run_dir, [*args, "resume=true"], monkeypatch)
    _assert_same_stage(resumed, run_dir, straight)


def test_an_epochs_0_stage_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # epochs=0 prunes the weights of ckpt_path: its state.pt, written at "epoch 0", lets a
    # stage stopped in fine-tuning go on from prune_state.pt rather than start again.
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(LeNet5().state_dict(), weights)
    args = [a for a in STAGED if not a.startswith("epochs=")]
    args += ["epochs=0", f"ckpt_path={weights}"]
    straight = tmp_path / "straight"
    run(compose_cfg(args), straight)
    run_dir = tmp_path / "run"
    finetune_forwards = STEPS_PER_EPOCH * 6  # two steps of 3 fine-tuning epochs
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(9 + 5, run_dir, args, monkeypatch)  # step 2, its second epoch
    assert torch.load(checkpoint.state_path(run_dir), weights_only=True)["epoch"] == 0
    point = torch.load(checkpoint.stage_path(run_dir), weights_only=True)
    assert point["step"] == 2 and point["finetune"]["epoch"] == 1

    resumed, counting = _run_with(-1, run_dir, [*args, "resume=true"], monkeypatch)
    assert counting.calls == finetune_forwards - STEPS_PER_EPOCH * (3 + 1)
    _assert_same_stage(resumed, run_dir, straight)


def test_a_completed_stage_leaves_no_resume_point(straight: Path) -> None:
    assert not checkpoint.stage_path(straight).exists()
    assert checkpoint.state_path(straight).exists()  # training's own stays (keep_state)


def test_a_corrupt_stage_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(3 + 5, run_dir, STAGED, monkeypatch)
    path = checkpoint.stage_path(run_dir)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"prune_state\.pt: cannot read the checkpoint"):
        run(compose_cfg([*STAGED, "resume=true"]), run_dir)


def test_a_resumed_stage_takes_the_curve_it_had_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The curve's amounts were evaluated before the stage began; a resume in fine-tuning
    # reports those rows rather than evaluating them again.
    args = [*STAGED, "pruning.curve=[0.3,0.9]"]
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(12 + 5, run_dir, args, monkeypatch)
    with open(run_dir / "curve.csv", newline="") as f:
        before = [float(r["test_acc"]) for r in csv.DictReader(f)]

    def no_curve(*args: object, **kwargs: object) -> None:
        raise AssertionError("the curve was evaluated again")

    monkeypatch.setattr("cifar_run.prune.curve.run_curve", no_curve)
    resumed, _ = _run_with(-1, run_dir, [*args, "resume=true"], monkeypatch)
    assert [r["amount"] for r in resumed["curve"]] == [0.0, 0.3, 0.9]
    assert [r["test_acc"] for r in resumed["curve"]] == pytest.approx(before)
    assert read_results(run_dir)["curve"] == resumed["curve"]
