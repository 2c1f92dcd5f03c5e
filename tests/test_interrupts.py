"""Ctrl-C at any moment of a run or sweep: one line, exit status 130, a state that resumes;
and runs killed at random moments (SIGINT, SIGTERM, SIGKILL) that resume to the numbers of
a run never interrupted."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cifar_run.engine import checkpoint
from cifar_run.outputs import atomic

from .conftest import CLI, TINY, one_line, read_results, run_cli, start

# TINY over three epochs, bit-reproducible (as tests/test_resume.py's RESUMABLE).
RESUMABLE = [*TINY, "epochs=3", "augment=standard", "deterministic=true"]
RESULT_KEYS = ("test_acc", "test_loss", "best_val_acc", "best_epoch", "final_train_acc")


def _start(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    """`cifar-run ARGS` as a terminal runs it: a process group of its own, which the
    terminal's Ctrl-C reaches as a whole (`_ctrl_c`), SIGINT not ignored (a background shell
    in CI may ignore it; a terminal's Ctrl-C is delivered)."""
    return start(
        [*CLI, *args],
        cwd,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen,
    )


def _ctrl_c(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:  # it has ended already
        pass


def _interrupt(proc: subprocess.Popen) -> str:
    """Ctrl-C, then the run's end: exit status 130 and its one stderr line."""
    _ctrl_c(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return one_line(err)


def _group_gone(pgid: int) -> bool:
    """Whether no process of the group is left (helpers, sweep workers)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the run's stdout until a line holding `text` (the little it prints after that
    fits the pipe until `communicate` reads it)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return
    pytest.fail(f"the run ended before printing {text!r}")


def _assert_resumable(run_dir: Path) -> None:
    """The checkpoint the interrupt line points to loads (resuming from it is the chaos
    test's part), or, where no epoch had finished, the line said so and there is none."""
    state = checkpoint.state_path(run_dir)
    if state.exists():
        assert checkpoint.load(state).epoch >= 1
    assert not list(run_dir.rglob(atomic.TEMP_PATTERN))


def _resume(args: list[str], run_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """What the interrupt line says to do: resume from the checkpoint, or with none (no
    epoch had finished), the same command again."""
    extra = ["resume=true"] if (run_dir / "checkpoints" / "state.pt").exists() else []
    return run_cli(*args, *extra, f"hydra.run.dir={run_dir}", cwd=cwd)


@pytest.mark.parametrize("after", [0.3, 0.8, 1.3, 1.8])
def test_ctrl_c_while_cifar_run_loads_is_one_line(tmp_path: Path, after: float) -> None:
    # Hydra and torch take seconds to load, and the config is composed twice. An interrupt
    # inside an import could be swallowed by the C code importing (the run then went on), or
    # leave a module half imported (the run then failed later, elsewhere); one inside Hydra's
    # config loading could be replaced by an error of Hydra's clean-up code (a traceback).
    run_dir = tmp_path / "run"
    proc = _start([*TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    time.sleep(after)
    line = _interrupt(proc)
    assert line.startswith("cifar-run: interrupted; "), line
    # Where the run had begun (a fast machine) it is marked failed; a press between the run
    # folder's making and its first results.json leaves none, and the line says to run again.
    if (run_dir / "results.json").exists():
        assert read_results(run_dir)["status"] == "failed"
    else:
        assert "had not started" in line or "run it again" in line, line


@pytest.mark.parametrize("after", [0.0, 1.2])
def test_ctrl_c_right_after_the_data_loads(tmp_path: Path, after: float) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=60"]
    proc = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path, stdout=subprocess.PIPE)
    _wait_for_line(proc, "data: ")
    time.sleep(after)
    assert _interrupt(proc).startswith("cifar-run: interrupted; ")
    assert _group_gone(proc.pid)
    assert read_results(run_dir)["status"] == "failed"
    _assert_resumable(run_dir)


def test_ctrl_c_twice_quickly_is_still_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=60"]
    proc = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path, stdout=subprocess.PIPE)
    _wait_for_line(proc, "epoch 2/60")  # epoch 1 has its checkpoint
    for gap in (0.02, 0.2):  # three presses (the last in _interrupt) close together
        _ctrl_c(proc)
        time.sleep(gap)
    line = _interrupt(proc)
    assert line.startswith("cifar-run: interrupted; resume from the last finished epoch"), line
    assert read_results(run_dir)["status"] == "failed"
    assert checkpoint.load(checkpoint.state_path(run_dir)).epoch >= 1


@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_ctrl_c_in_a_sweep_is_one_line_and_the_rerun_completes(
    tmp_path: Path, launcher: str
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "epochs=6", "lr=0.01,0.02", f"hydra.sweep.dir={sweep_dir}"]
    if launcher == "parallel":  # two joblib worker processes
        args += ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    proc = _start(args, tmp_path, stdout=subprocess.PIPE)
    _wait_for_line(proc, "epoch 2/6")  # a job is training
    assert _interrupt(proc) == (
        f"cifar-run: interrupted; rerun the same command with hydra.sweep.dir={sweep_dir}: "
        "completed jobs are skipped, the interrupted one resumes from its last finished epoch"
    )
    assert _group_gone(proc.pid)  # no worker trains on
    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all(read_results(j)["status"] == "completed" for j in jobs)
    assert all(len(_metric_rows(j)) == 6 for j in jobs)


CHAOS_RUNS = 9  # three of each signal, each at its own random moment
CHAOS_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def _chaos_run(
    run_dir: Path, sig: signal.Signals, delay: float, cwd: Path, straight: Path
) -> str | None:
    """Start a run, signal it `delay` seconds later, resume it; None if all went as it
    should, else what went wrong."""
    proc = _start([*RESUMABLE, f"hydra.run.dir={run_dir}"], cwd)
    time.sleep(delay)
    if sig == signal.SIGINT:
        _ctrl_c(proc)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    what = f"{sig.name} after {delay:.2f} s"
    if proc.returncode == 0:  # it finished first
        pass
    elif sig == signal.SIGINT:
        lines = [line for line in err.splitlines() if line.strip()]
        if proc.returncode != 130 or len(lines) != 1 or "Traceback" in err:
            return f"{what}: exit {proc.returncode}, stderr {err!r}"
    elif proc.returncode != -sig:
        return f"{what}: exit {proc.returncode}, stderr {err[-2000:]!r}"
    resumed = _resume(RESUMABLE, run_dir, cwd)
    if resumed.returncode != 0:
        return f"{what}: the resume failed: {resumed.stderr[-2000:]!r}"
    a, b = read_results(run_dir), read_results(straight)
    if a["status"] != "completed" or any(a[k] != b[k] for k in RESULT_KEYS):
        return f"{what}: results differ: {a} vs {b}"
    if _metric_rows(run_dir) != _metric_rows(straight):
        return f"{what}: metrics.csv differs"
    leftovers = [p.name for p in run_dir.rglob(".*.tmp")]
    if leftovers:
        return f"{what}: temp files left: {leftovers}"
    return None


@pytest.mark.slow
def test_runs_killed_at_random_moments_resume_to_the_same_numbers(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    began = time.monotonic()
    proc = run_cli(*RESUMABLE, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    whole = time.monotonic() - began
    rng = random.Random(31)
    # From 0.5 s: the first instants are Python's own start-up, before any cifar-run code.
    plan = [(CHAOS_SIGNALS[i % 3], rng.uniform(0.5, whole)) for i in range(CHAOS_RUNS)]
    with ThreadPoolExecutor(2) as pool:  # two at a time: the machine has two cores
        problems = list(
            pool.map(
                lambda item: _chaos_run(tmp_path / f"run{item[0]}", *item[1], tmp_path, straight),
                enumerate(plan),
            )
        )
    assert [p for p in problems if p] == []
