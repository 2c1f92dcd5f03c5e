"""The operating system refusing a write (a full disk, a file too large, no permission, a
read-only file system): one line naming the file and what to do, exit status 74, the last
whole checkpoint kept, no temp file, no claim of completion."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cifar_run.engine import checkpoint
from cifar_run.engine.reproducibility import set_deterministic
from cifar_run.exits import os_error_line
from cifar_run.outputs import atomic

from .conftest import TINY, one_line, read_results, run_cli, run_code
from .test_resume import RESUMABLE, STEPS_PER_EPOCH, _faulty_run, _metric_rows

# `cifar-run ARGS` after a change to this process: the code in PATCH, then the entry point.
WRAPPER = """
import sys
{patch}
sys.argv = ["cifar-run", *sys.argv[1:]]
from cifar_run.__main__ import main
main()
"""

# The second write of checkpoints/state.pt fails with the errno given (the first, epoch 1's,
# goes through): os.replace is where a full disk's rename or a read-only remount would fail.
FAIL_SECOND_STATE = """
import errno, os
failures = {{"state.pt": 0}}
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("state.pt"):
        failures["state.pt"] += 1
        if failures["state.pt"] == 2:
            raise OSError({errno}, os.strerror({errno}), src)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""

# A real refusal of the kernel: writes past LIMIT bytes of one file fail with EFBIG (with
# SIGXFSZ ignored; by default it would kill the process).
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.fixture(autouse=True)
def _restore_determinism() -> Iterator[None]:
    yield
    set_deterministic(False)  # run() with deterministic=true switches it on process-wide


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(atomic.TEMP_PATTERN)]


# ---------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("where", ["write", "replace", "create"])
def test_a_failed_write_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / "results.json"
    atomic.write_text(path, "old")

    def refuse(*args: object, **kwargs: object) -> None:
        code = {"write": errno.ENOSPC, "replace": errno.EROFS, "create": errno.EACCES}[where]
        # A failed write(2) names no file; os.replace and os.open name the temp file.
        raise OSError(code, os.strerror(code), None if where == "write" else str(args[0]))

    if where == "write":
        with pytest.raises(OSError) as info:
            atomic._atomic_write(path, refuse)
    else:
        monkeypatch.setattr(atomic.os, "replace" if where == "replace" else "open", refuse)
        with pytest.raises(OSError) as info:
            atomic.write_text(path, "new")
    assert info.value.filename == str(path)  # the file meant, not its temp file
    assert isinstance(info.value, PermissionError) == (where == "create")
    assert path.read_text() == "old" and _temps(tmp_path) == []


def test_ctrl_c_as_the_temp_file_is_created_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C raises wherever the main thread is: here after the temp file exists but before
    the call that created it has returned its name."""
    path = tmp_path / "results.json"
    atomic.write_text(path, "old")
    real_open = os.open

    def create_then_interrupt(*args: object, **kwargs: object) -> None:
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "open", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and _temps(tmp_path) == []


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".state.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "state.pt").write_bytes(b"whole")
    atomic.remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.ENOSPC, "free space on that disk"),
        (errno.EACCES, "make the folder writable"),
        (errno.EROFS, "read-only file system"),
        (errno.EFBIG, "ulimit -f"),
        (errno.EIO, None),
    ],
)
def test_os_error_line_names_the_file_and_what_to_do(code: int, advice: str | None) -> None:
    line = os_error_line(OSError(code, os.strerror(code), "/runs/a/results.json"))
    assert line.startswith(f"/runs/a/results.json: {os.strerror(code)}")
    assert (advice in line) if advice else ";" not in line


# ---------------------------------------------------------------------------------------------
# Through the CLI


def test_a_refused_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    # A read-only remount under a running run: the rename of state.pt fails. (What each errno
    # advises is checked above; a real full disk below.)
    run_dir, code = tmp_path / "run", errno.EROFS
    code_text = WRAPPER.format(patch=FAIL_SECOND_STATE.format(errno=code))
    proc = run_code(code_text, *RESUMABLE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 74, proc.stderr
    state = checkpoint.state_path(run_dir)
    assert one_line(proc.stderr) == (
        f"cifar-run: error: {os_error_line(OSError(code, os.strerror(code), str(state)))}; "
        "resume from the last finished epoch: the same command plus resume=true "
        f"hydra.run.dir={run_dir}"
    )
    assert checkpoint.load(state).epoch == 1  # the last whole checkpoint
    assert _temps(run_dir) == []
    results = read_results(run_dir)
    assert results["status"] == "failed" and not (run_dir / "results.csv").exists()

    resumed = run_cli(*RESUMABLE, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(run_dir)["status"] == "completed" and len(_metric_rows(run_dir)) == 3


@contextmanager
def _small_disk(folder: Path) -> Iterator[bool]:
    """`folder` as a tmpfs of its own where this process may mount one (root): True; else
    False, and `folder` is an ordinary folder (the caller then makes writes fail another way)."""
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
        mounted = subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run that stopped after epoch 1 (crashed), resumed where the next checkpoint no longer
    # fits: on a real full file system (a 4 MiB tmpfs, filled up) where this test may mount
    # one, else under a file size limit of the kernel (RLIMIT_FSIZE: EFBIG past the limit).
    with _small_disk(tmp_path / "disk") as mounted:
        run_dir = tmp_path / "disk" / "run"
        _faulty_run(monkeypatch, run_dir, at=STEPS_PER_EPOCH + 2, fault="crash")
        state = checkpoint.state_path(run_dir)
        before = state.read_bytes()
        weights = (run_dir / "checkpoints" / "last.pt").stat().st_size
        filler = tmp_path / "disk" / "filler"
        if mounted:  # leave room for the small files, not for a checkpoint
            disk = os.statvfs(filler.parent)
            filler.write_bytes(b"\0" * (disk.f_bavail * disk.f_frsize - weights // 2))
            patch, reason = "", os.strerror(errno.ENOSPC)
        else:  # best.pt and last.pt fit; state.pt (weights and momenta) does not
            assert len(before) > weights + 20_000
            patch, reason = FILE_SIZE_LIMIT.format(limit=weights + 20_000), os.strerror(errno.EFBIG)
        proc = run_code(
            WRAPPER.format(patch=patch),
            *RESUMABLE,
            "resume=true",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert proc.returncode == 74, proc.stderr
        line = one_line(proc.stderr)
        assert re.fullmatch(
            rf"cifar-run: error: {re.escape(str(run_dir))}/checkpoints/(best|last|state)\.pt: "
            rf"{reason}; [^;]+; resume from the last finished epoch: the same command plus "
            rf"resume=true hydra\.run\.dir={re.escape(str(run_dir))}",
            line,
        ), line
        assert state.read_bytes() == before and checkpoint.load(state).epoch == 1
        assert _temps(run_dir) == [] and read_results(run_dir)["status"] == "failed"

        filler.unlink(missing_ok=True)  # space again: the run carries on where it stopped
        resumed = run_cli(*RESUMABLE, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert read_results(run_dir)["status"] == "completed" and len(_metric_rows(run_dir)) == 3


# ---------------------------------------------------------------------------------------------
# Checkpoints the weights-only loader refuses


def test_a_refused_checkpoint_is_one_line_with_torch_warnings_folded_in(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0]}, protocol=5))  # not torch.save's
    proc = run_cli(*TINY, f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"cifar-run: error: ckpt_path={path}: cannot read it as a state dict")
    assert "Warning" not in proc.stderr
