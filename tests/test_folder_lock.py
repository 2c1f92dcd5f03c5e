"""One cifar-run per run or sweep folder: a lock that dies with its process, a second process
refused in one line naming the folder and the pid, and sweep folders that do not collide."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from cifar_run.outputs import folder_lock

from .conftest import CLI, TINY, one_line, read_results, run_cli, start, subprocess_env

HOLD = (
    "import sys, time\n"
    "from cifar_run.outputs import folder_lock\n"
    "folder_lock.acquire(sys.argv[1], 'hydra.run.dir')\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s lock (until it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_a_held_folder_is_refused_and_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        refusal = f"hydra.run.dir={folder}: in use by another cifar-run (pid {holder.pid})"
        with pytest.raises(folder_lock.FolderInUse, match=re.escape(refusal)):
            folder_lock.acquire(folder, "hydra.run.dir")
        with pytest.raises(folder_lock.FolderInUse, match=re.escape(refusal)):
            folder_lock.refuse_if_in_use(folder, "hydra.run.dir")
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    folder_lock.refuse_if_in_use(folder, "hydra.run.dir")  # the kernel dropped the lock
    with folder_lock.held(folder, "hydra.run.dir"):
        assert folder_lock.holds(folder)
        assert (folder / folder_lock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with folder_lock.held(folder, "hydra.run.dir"):  # held already: kept after the inner block
            pass
        assert folder_lock.holds(folder)
    assert not folder_lock.holds(folder)


def test_a_probe_creates_nothing(tmp_path: Path) -> None:
    folder_lock.refuse_if_in_use(tmp_path / "new", "hydra.run.dir")
    assert not (tmp_path / "new").exists()


def test_two_runs_started_at_once_into_one_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*CLI, *TINY, "epochs=3", f"hydra.run.dir={run_dir}"]
    procs = [start(args, tmp_path) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert one_line(errs[loser]) == (
        f"cifar-run: error: hydra.run.dir={run_dir}: in use by another cifar-run "
        f"(pid {procs[winner].pid}); wait for it to end, or choose another hydra.run.dir"
    )
    # One complete run, written by one process.
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["epochs_run"] == 3
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4
    log = (run_dir / "cifar-run.log").read_text()
    assert log.count("test acc per class") == 1 and log.count("data: ") == 1
    state = torch.load(run_dir / "checkpoints" / "state.pt", weights_only=True)
    assert state["epoch"] == 3
    assert (run_dir / folder_lock.LOCK_FILE).read_text() == f"{procs[winner].pid}\n"


def test_a_second_sweep_into_a_sweep_folder_in_use_is_refused(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "epochs=2", "lr=0.01,0.02", f"hydra.sweep.dir={sweep_dir}"]
    first = start([*CLI, *args], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline:
            if (sweep_dir / folder_lock.LOCK_FILE).is_file():
                if (sweep_dir / folder_lock.LOCK_FILE).read_text().strip() == str(first.pid):
                    break
            time.sleep(0.01)
        second = run_cli(*args, cwd=tmp_path)
    finally:
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    line = one_line(second.stderr)
    assert f"hydra.sweep.dir={sweep_dir}: in use by another cifar-run (pid {first.pid})" in line
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all(read_results(j)["status"] == "completed" for j in jobs)
    assert all(read_results(j)["epochs_run"] == 2 for j in jobs)


def test_default_sweep_folders_of_one_second_differ(tmp_path: Path) -> None:
    from cifar_run.config.compose import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dirs = [
            str(compose(config_name="config", return_hydra_config=True).hydra.sweep.dir)
            for _ in range(2)
        ]
    assert dirs[0] != dirs[1]
    assert re.fullmatch(r"outputs/sweeps/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", dirs[0]), dirs

    # Two sweeps started together, each into its default folder: two sweep folders.
    procs = [start([*CLI, "-m", *TINY, "data.subset=2", "lr=0.01"], tmp_path) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    sweeps = list((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 2
    for folder in sweeps:
        (job,) = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert read_results(job)["status"] == "completed"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("runs/lr=0.1", "mismatched input '='"),
        ("runs/#1", "'#' cannot stand there"),
        ("${nowhere}", "cannot be resolved"),
    ],
)
def test_a_run_folder_hydra_cannot_parse_is_one_line_naming_the_key(
    tmp_path: Path, value: str, reason: str
) -> None:
    proc = run_cli(*TINY, f"hydra.run.dir={value}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("cifar-run: error: hydra.run.dir") and reason in line
    assert "Traceback" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing made
    if "=" in value:  # the quotes it suggests work: through the shell, then Hydra's parser
        (suggested,) = shlex.split(line.rpartition("e.g. ")[2])
        (parsed,) = OverridesParser.create().parse_overrides([suggested])
        assert parsed.key_or_group == "hydra.run.dir" and parsed.value() == value
