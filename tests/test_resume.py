"""Checkpoints, resume, divergence: a run killed or failed at any point loses nothing."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cifar_run import cli
from cifar_run.config import compare
from cifar_run.engine import checkpoint
from cifar_run.engine.loop import NonFiniteLoss, train_one_epoch
from cifar_run.engine.optim import build_optimizer, build_scheduler
from cifar_run.engine.reproducibility import rng_state, set_deterministic, set_rng_state
from cifar_run.errors import CheckpointError, TrainingDiverged
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run

from .conftest import CLI, TEST_DATA, TINY, compose_cfg, one_line, read_results, run_cli, start

# TINY over three epochs with the augmentation stream in play: 90 training images, 3 steps
# per epoch at batch size 32, 10 validation images.
RESUMABLE = [*TINY, "epochs=3", "augment=standard", "deterministic=true"]
STEPS_PER_EPOCH = 3


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    set_deterministic(False)  # run() with deterministic=true switches it on process-wide


class Faulty(LeNet5):
    """LeNet-5 whose `at`-th training forward pass (one per step) goes wrong: NaN outputs,
    or a crash."""

    def __init__(self, at: int, fault: str) -> None:
        super().__init__()
        self.at, self.fault, self.calls = at, fault, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                if self.fault == "crash":
                    raise RuntimeError("simulated crash")
                out = out * float("nan")
        return out


def _faulty_run(monkeypatch: pytest.MonkeyPatch, run_dir: Path, at: int, fault: str) -> Exception:
    """run() in-process with a Faulty model; returns the exception it raised."""
    with monkeypatch.context() as m, pytest.raises(Exception) as info:
        m.setattr("cifar_run.run.build_model", lambda cfg: Faulty(at, fault))
        run(compose_cfg(RESUMABLE), run_dir)
    return info.value


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows as written (exact float text) without the wall-time column."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{a.name}: {key} differs"


def crash_then_resume(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, at: int
) -> tuple[Path, Path]:
    """Run `args` in-process until the `at`-th training forward crashes, resume it from its
    checkpoint with the CLI, and run it straight through; both must end completed with the
    same metrics.csv, results and best.pt/last.pt. Returns the two run folders."""
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        m.setattr("cifar_run.run.build_model", lambda cfg: Faulty(at=at, fault="crash"))
        run(compose_cfg(args), crashed)
    assert checkpoint.load(checkpoint.state_path(crashed)).epoch >= 1
    for extra, folder in ((["resume=true"], crashed), ([], straight)):
        proc = run_cli(*args, *extra, f"hydra.run.dir={folder}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    a, b = read_results(crashed), read_results(straight)
    assert a["status"] == b["status"] == "completed"
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "final_train_acc"):
        assert a[key] == b[key], key
    assert _metric_rows(crashed) == _metric_rows(straight)
    for name in ("best.pt", "last.pt"):
        _assert_same_weights(crashed / "checkpoints" / name, straight / "checkpoints" / name)
    return crashed, straight


def _kill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path) -> bool:
    """Start a run, SIGKILL it as soon as its first checkpoint exists; False if it completed."""
    proc = start([*CLI, *args, f"hydra.run.dir={run_dir}"], cwd)
    state = checkpoint.state_path(run_dir)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert state.exists(), err
    return read_results(run_dir)["status"] != "completed"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers_bit_for_bit(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    # The kill lands wherever the run is when the checkpoint shows up; should the whole run
    # have finished by then (a fast machine), try again with more epochs.
    for epochs in (4, 16, 64):
        args = [*RESUMABLE, "data.subset=30", f"epochs={epochs}"]
        if _kill_after_first_checkpoint(args, killed, tmp_path):
            break
        killed = tmp_path / f"killed-{epochs}"
    else:
        pytest.fail("every run finished before it could be killed")

    interrupted = read_results(killed)
    assert interrupted["status"] == "running"  # a killed run claims nothing
    assert not (killed / "results.csv").exists()
    done = checkpoint.load(checkpoint.state_path(killed)).epoch
    assert 1 <= done <= epochs

    resumed = run_cli(*args, "resume=true", f"hydra.run.dir={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    proc = run_cli(*args, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    a, b = read_results(killed), read_results(straight)
    assert a["status"] == b["status"] == "completed"
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "final_train_acc"):
        assert a[key] == b[key], key
    rows = _metric_rows(killed)
    assert len(rows) == epochs and rows == _metric_rows(straight)
    for name in ("best.pt", "last.pt"):
        _assert_same_weights(killed / "checkpoints" / name, straight / "checkpoints" / name)


def test_ctrl_c_is_one_line_saying_how_to_resume_and_the_resume_completes(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    for epochs in (20, 400, 3000):  # the interrupt must land before the run ends
        args = [*TINY, f"epochs={epochs}"]
        proc = start(
            [*CLI, *args, f"hydra.run.dir={run_dir}"],
            tmp_path,
            # A background shell (CI) may ignore SIGINT; a terminal's Ctrl-C is delivered.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 300
        state = checkpoint.state_path(run_dir)
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        if read_results(run_dir)["status"] != "completed":
            break
        shutil.rmtree(run_dir)
    else:
        pytest.fail("every run finished before Ctrl-C could reach it")

    assert proc.returncode == 130, err
    line = one_line(err)
    hint = f"the same command plus resume=true hydra.run.dir={run_dir}"
    assert line.startswith("cifar-run: interrupted; resume") and hint in line, err
    results = read_results(run_dir)
    assert results["status"] == "failed" and results["error"] == "KeyboardInterrupt"
    resumed = run_cli(*args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(run_dir)["status"] == "completed"
    assert len(_metric_rows(run_dir)) == epochs


def test_crashed_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    exc = _faulty_run(monkeypatch, run_dir, at=STEPS_PER_EPOCH + 2, fault="crash")
    assert str(exc) == "simulated crash"
    failed = read_results(run_dir)
    assert failed["status"] == "failed" and failed["error"] == "simulated crash"
    first_rows = _metric_rows(run_dir)
    assert checkpoint.load(checkpoint.state_path(run_dir)).epoch == 1 and len(first_rows) == 1

    proc = run_cli(*RESUMABLE, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_results(run_dir)["status"] == "completed"
    rows = _metric_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0] == first_rows[0]
    assert checkpoint.load(checkpoint.state_path(run_dir)).epoch == 3


def test_truncated_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _faulty_run(monkeypatch, run_dir, at=STEPS_PER_EPOCH + 2, fault="crash")
    state = checkpoint.state_path(run_dir)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    before = _metric_rows(run_dir)

    proc = run_cli(*RESUMABLE, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert str(state) in line and "truncated or corrupt" in line
    # Never a silent restart: the run folder is as the crash left it.
    assert _metric_rows(run_dir) == before and read_results(run_dir)["status"] == "failed"

    state.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="state.pt"):
        checkpoint.load(state)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    exc = _faulty_run(monkeypatch, run_dir, at=STEPS_PER_EPOCH + 2, fault="nan")
    assert isinstance(exc, TrainingDiverged)
    message = str(exc)
    assert "\n" not in message
    # Epoch 2's rate after one cosine step over 3 epochs: 0.01 * (1 + cos(pi / 3)) / 2.
    assert f"epoch 2, step 2/{STEPS_PER_EPOCH}" in message and "(lr 0.0075)" in message
    assert "loss nan" in message and "epoch 1" in message

    results = read_results(run_dir)
    assert results["status"] == "failed" and results["error"] == message
    assert not (run_dir / "results.csv").exists() and len(_metric_rows(run_dir)) == 1
    state = torch.load(checkpoint.state_path(run_dir), weights_only=True)
    assert state["epoch"] == 1
    model = LeNet5()
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _assert_same_weights(run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt")


def test_diverging_cli_run_exits_2_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "lr=1e30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "training diverged" in line and "epoch 1, step" in line
    assert "lr 1e+30" in line
    assert read_results(run_dir)["status"] == "failed"
    assert not checkpoint.state_path(run_dir).exists()


def test_resume_under_another_config_names_the_differences(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(compose_cfg([*TINY, "epochs=2"]), run_dir)
    overrides = (run_dir / ".hydra").exists()
    proc = run_cli(
        *TINY, "epochs=2", "lr=0.02", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "lr: 0.01 -> 0.02" in line and "epochs" not in line  # only the keys that differ
    # Refused before Hydra starts: it did not write its record into the folder.
    assert (run_dir / ".hydra").exists() == overrides
    assert read_results(run_dir)["status"] == "completed"


def test_resume_takes_the_data_folder_by_location_not_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run(compose_cfg(TINY), run_dir)  # data.root absolute
    # As if killed after the last checkpoint, before the test pass.
    (run_dir / "results.json").write_text(json.dumps({"status": "running"}))
    monkeypatch.chdir(tmp_path)
    without_root = [a for a in TINY if not a.startswith("data.root=")]
    relative = f"data.root={os.path.relpath(TEST_DATA, tmp_path)}"
    resumed = run(compose_cfg([*without_root, relative, "resume=true"]), run_dir)
    assert resumed["epochs_run"] == 1 and read_results(run_dir)["status"] == "completed"

    copy = tmp_path / "copy"  # the same images in another folder: another data.root
    shutil.copytree(TEST_DATA, copy)
    (run_dir / "results.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(CheckpointError, match=r"data\.root: .* -> copy"):
        run(compose_cfg([*without_root, "data.root=copy", "resume=true"]), run_dir)


def test_completed_run_is_not_retrained(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(compose_cfg(TINY), run_dir)
    state = checkpoint.state_path(run_dir)
    stamp = state.stat().st_mtime_ns, (run_dir / "metrics.csv").read_text()
    proc = run_cli(*TINY, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stdout
    assert (state.stat().st_mtime_ns, (run_dir / "metrics.csv").read_text()) == stamp


def test_a_new_run_does_not_overwrite_a_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(compose_cfg(TINY), run_dir)
    proc = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"hydra.run.dir={run_dir}" in proc.stderr and "resume=true" in proc.stderr


def test_keep_state_false_removes_state_pt_and_the_folder_stays_guarded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(compose_cfg([*TINY, "keep_state=false"]), run_dir)
    assert not checkpoint.state_path(run_dir).exists()
    assert (run_dir / "checkpoints" / "best.pt").exists()
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert read_results(run_dir)["status"] == "completed"
    metrics = (run_dir / "metrics.csv").read_text()

    fresh = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert fresh.returncode == 2 and "already holds a completed run" in fresh.stderr
    again = run_cli(*TINY, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout, again.stderr
    other = run_cli(*TINY, "lr=0.02", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert other.returncode == 2 and "lr: 0.01 -> 0.02" in one_line(other.stderr)
    assert (run_dir / "metrics.csv").read_text() == metrics  # nothing rewritten


def test_deterministic_runs_repeat_exactly(tmp_path: Path) -> None:
    first = run(compose_cfg([*RESUMABLE, "epochs=1"]), tmp_path / "a")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    second = run(compose_cfg([*RESUMABLE, "epochs=1"]), tmp_path / "b")
    assert first["test_loss"] == second["test_loss"]
    _assert_same_weights(tmp_path / "a/checkpoints/last.pt", tmp_path / "b/checkpoints/last.pt")


# ---------------------------------------------------------------------------------------------
# The pieces


def test_rng_states_round_trip() -> None:
    generators = {"order": torch.Generator().manual_seed(3)}

    def draw() -> tuple:
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),
            [random.random() for _ in range(3)],
            torch.randperm(10, generator=generators["order"]).tolist(),
        )

    draw()
    saved = rng_state(generators)
    expected = draw()
    draw()
    set_rng_state(saved, generators)
    assert draw() == expected


def test_checkpoint_holds_only_what_weights_only_loads(tmp_path: Path) -> None:
    cfg = compose_cfg(TINY)
    model = LeNet5()
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=2)
    train_one_epoch(
        model,
        [(torch.randn(4, 3, 32, 32), torch.arange(4))] * 2,
        optimizer,
        nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
    )
    scheduler.step_epoch({"val_loss": 2.0, "val_acc": 12.5})
    loop = checkpoint.LoopState(epoch=1, history=[{"epoch": 1, "val_acc": 12.5}], best_epoch=1)
    gen = {"order": torch.Generator().manual_seed(1)}
    device = torch.device("cpu")
    kwargs = {"optimizer": optimizer, "scheduler": scheduler, "generators": gen}
    checkpoint.save(tmp_path, loop, model=model, cfg=cfg, device=device, **kwargs)

    ckpt = checkpoint.load(checkpoint.state_path(tmp_path))  # weights_only=True inside
    assert ckpt.data["config_hash"] == compare.config_hash(cfg)
    fresh = LeNet5()
    optimizer2 = build_optimizer(cfg.optim, fresh.parameters(), cfg.lr)
    scheduler2 = build_scheduler(cfg.sched, optimizer2, epochs=cfg.epochs, steps_per_epoch=2)
    restored = checkpoint.restore(
        ckpt,
        model=fresh,
        optimizer=optimizer2,
        scheduler=scheduler2,
        generators={"order": torch.Generator()},
    )
    assert restored.epoch == 1 and restored.history == loop.history
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.best_state[key], value)  # best == current: stored once
        assert torch.equal(fresh.state_dict()[key], value)


def test_config_diff_ignores_keys_that_do_not_change_results() -> None:
    base = compose_cfg(TINY)
    same = compose_cfg(
        [*TINY, "resume=true", "data.cache_dir=/elsewhere", "device=auto", "keep_state=false"]
    )
    assert compare.config_diff(base, same) == []
    assert compare.config_hash(base) == compare.config_hash(same)
    other = compose_cfg([*TINY, "seed=1", "optim.momentum=0.5"])
    assert compare.config_diff(base, other) == ["optim.momentum: 0.9 -> 0.5", "seed: 0 -> 1"]


def test_keys_added_later_at_their_defaults_do_not_set_old_runs_apart() -> None:
    # A run written before `mix`, `ema`, optim.grad_clip and optim.decay_norm_and_bias
    # existed compares equal to today's defaults, and unequal to a config that uses them.
    added = ("mix.", "ema", "optim.grad_clip", "optim.decay_norm_and_bias")
    snapshot = compare.config_snapshot(compose_cfg(TINY))
    old = {k: v for k, v in snapshot.items() if not k.startswith(added)}
    assert len(old) < len(snapshot)
    assert compare.config_diff(old, compose_cfg(TINY)) == []
    # The hash (prune_state.pt's check) agrees with the diff.
    assert compare.config_hash(old) == compare.config_hash(compose_cfg(TINY))
    other = compose_cfg([*TINY, "optim.decay_norm_and_bias=false", "ema=0.9"])
    assert compare.config_hash(old) != compare.config_hash(other)
    assert compare.config_diff(old, other) == [
        "ema: <absent> -> 0.9",
        "optim.decay_norm_and_bias: <absent> -> False",
    ]


def test_nan_is_named_at_its_exact_step_however_rarely_checked() -> None:
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    good = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    bad = (torch.full((2, 3, 32, 32), math.inf), torch.zeros(2, dtype=torch.long))
    for check_every in (1, 4, 100):
        with pytest.raises(NonFiniteLoss) as info:
            train_one_epoch(
                model,
                [good] * 6 + [bad] + [good] * 5,
                optimizer,
                nn.CrossEntropyLoss(),
                device=torch.device("cpu"),
                check_every=check_every,
            )
        assert info.value.step == 7 and info.value.lr == 0.1
        model.load_state_dict(LeNet5().state_dict())  # the bad step ruined the weights


def _options(group: str) -> list[str]:
    from cifar_run.config.compose import groups

    return groups()[group]


@pytest.mark.parametrize("sched", _options("sched"))
@pytest.mark.parametrize("optim", _options("optim"))
def test_every_optimizer_and_schedule_state_loads_with_weights_only(
    tmp_path: Path, optim: str, sched: str
) -> None:
    cfg = compose_cfg([*TINY, f"optim={optim}", f"sched={sched}"])
    model = LeNet5()
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=1)
    batch = (torch.randn(4, 3, 32, 32), torch.arange(4))
    train_one_epoch(model, [batch], optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu"))
    loop = checkpoint.LoopState(epoch=1, best_epoch=1)
    gen = {"order": torch.Generator()}
    checkpoint.save(
        tmp_path,
        loop,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generators=gen,
        cfg=cfg,
        device=torch.device("cpu"),
    )
    data = checkpoint.load(checkpoint.state_path(tmp_path)).data
    assert data["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    if scheduler is not None:
        assert data["scheduler"] == scheduler.state_dict()


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ([checkpoint.STATE_FILE], "resume from the last finished epoch"),
        ([checkpoint.STATE_FILE, checkpoint.STAGE_FILE], "resume where the pruning stage stopped"),
        ([], "no epoch had finished"),
    ],
    ids=["training", "pruning-stage", "nothing"],
)
def test_ctrl_c_says_where_the_resume_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: list[Path], where: str
) -> None:
    for file in files:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        cli._interrupted(tmp_path, None, dry_run=False)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith(f"cifar-run: interrupted; {where}"), err
    assert len(err.strip().splitlines()) == 1
