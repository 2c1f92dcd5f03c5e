"""Multirun through the real CLI: the sweep summary, failing jobs, resume, the joblib launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cifar_run.errors import UserError
from cifar_run.outputs import sweep

from .conftest import TEST_DATA, TINY, one_line, read_results, run_cli, run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rerun_into(
    sweep_dir: Path, args: tuple, cwd: Path, cache_dir: Path, changes: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """The sweep command `args` again, into `sweep_dir`, with the `changes` (key: value) in
    place of the values it had."""
    changes = {"hydra.sweep.dir": sweep_dir, **(changes or {})}
    kept = [a for a in args if a.split("=")[0] not in changes]
    changed = [f"{key}={value}" for key, value in changes.items()]
    return run_cli(*kept, *changed, cwd=cwd, env={"CIFAR_RUN_CACHE": str(cache_dir)})


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def two_job_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple:
    """One real 2-job sweep shared by the tests that only read it (or copy it)."""
    root = tmp_path_factory.mktemp("sweep")
    args = ("-m", *TINY, "lr=0.01,0.02", f"hydra.sweep.dir={root / 'sweep'}")
    proc = run_cli(*args, cwd=root, env={"CIFAR_RUN_CACHE": str(cache_dir)})
    return root / "sweep", proc, args


@pytest.fixture
def sweep_copy(two_job_sweep: tuple, tmp_path: Path) -> tuple[Path, tuple]:
    """A copy of the shared sweep to rerun into (copy2 keeps modification times), and the
    command that made it."""
    original, _, args = two_job_sweep
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(original, sweep_dir)
    return sweep_dir, args


@pytest.mark.slow  # the shared sweep takes about 20 s
def test_two_job_sweep_writes_summary_table_and_plot(two_job_sweep: tuple) -> None:
    sweep_dir, proc, _ = two_job_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert "lr=0.01" in jobs[0].name and "lr=0.02" in jobs[1].name
    assert all("data.root" not in j.name for j in jobs)  # paths stay out of folder names

    table = pd.read_csv(sweep_dir / "summary.csv")
    assert len(table) == 2
    assert list(table.columns[:1]) == ["lr"]  # the swept key comes first
    assert {"test_acc", "best_val_acc", "status", "model", "params"} <= set(table.columns)
    assert sorted(table["lr"]) == [0.01, 0.02]
    assert (table["status"] == "completed").all()
    assert table["test_acc"].between(0, 100).all()
    for job, (_, row) in zip(jobs, table.iterrows(), strict=True):
        assert row["test_acc"] == pytest.approx(read_results(job)["test_acc"])

    md = (sweep_dir / "summary.md").read_text().splitlines()
    assert md[0].startswith("| lr |") and "test_acc" in md[0] and len(md) == 6
    assert md[4] == "" and md[5].startswith("selected on validation: lr=")
    assert md[0] in proc.stdout  # the table is also printed at the end of the sweep
    assert (sweep_dir / "summary.png").read_bytes()[:8] == PNG_MAGIC
    assert not (sweep_dir / "summary_seeds.csv").exists()  # seed was not swept


@pytest.mark.slow
def test_report_reprints_the_sweep_table(two_job_sweep: tuple) -> None:
    sweep_dir, _, _ = two_job_sweep
    expected = (sweep_dir / "summary.md").read_text()
    proc = run_report(str(sweep_dir), cwd=sweep_dir.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


@pytest.mark.slow
def test_report_on_two_run_folders_prints_a_table(two_job_sweep: tuple, tmp_path: Path) -> None:
    sweep_dir, _, _ = two_job_sweep
    jobs = job_dirs(sweep_dir)
    runs = [tmp_path / "a", tmp_path / "b"]  # run folders outside their sweep
    for job, run in zip(jobs, runs, strict=True):
        shutil.copytree(job, run)
    proc = run_report(*map(str, runs), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| lr |") and len(lines) == 6  # lr differs: a column of its own
    assert lines[5].startswith("selected on validation: lr=")
    assert "| a |" in lines[2] + lines[3] and "| b |" in lines[2] + lines[3]
    assert "--out" in proc.stderr and not list(tmp_path.glob("summary.*"))

    proc = run_report(*map(str, runs), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(tmp_path / "cmp" / "summary.csv")) == 2
    assert (tmp_path / "cmp" / "summary.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_interrupted_sweep_resumes_skipping_completed_jobs(
    sweep_copy: tuple, tmp_path: Path, cache_dir: Path
) -> None:
    sweep_dir, args = sweep_copy
    done, killed = job_dirs(sweep_dir)
    # What a kill during the second job leaves behind: its results.json still says running.
    state = read_results(killed)
    state.pop("test_acc")
    (killed / "results.json").write_text(json.dumps({**state, "status": "running"}))
    files = ["results.json", "results.csv", "metrics.csv", "checkpoints/best.pt"]
    before = {f: (done / f).stat().st_mtime_ns for f in files}
    killed_before = (killed / "metrics.csv").stat().st_mtime_ns

    proc = rerun_into(sweep_dir, args, tmp_path, cache_dir)  # the same command, into the copy
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping completed job {done.name}" in proc.stdout
    assert f"skipping completed job {killed.name}" not in proc.stdout
    assert {f: (done / f).stat().st_mtime_ns for f in files} == before  # untouched
    assert read_results(killed)["status"] == "completed" and "test_acc" in read_results(killed)
    assert (killed / "metrics.csv").stat().st_mtime_ns != killed_before  # trained again
    assert [j.name for j in job_dirs(sweep_dir)] == [done.name, killed.name]
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # The bad value comes first: the job after it must still run.
    proc = run_cli("-m", *TINY, "lr=-1,0.01", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    bad, good = job_dirs(sweep_dir)
    assert read_results(bad)["status"] == "failed" and "lr=-1" in read_results(bad)["error"]
    assert read_results(good)["status"] == "completed"

    table = pd.read_csv(sweep_dir / "summary.csv").set_index("lr")
    assert table.loc[-1, "status"] == "failed"
    assert "lr=-1: must be a positive number" in table.loc[-1, "error"]
    assert table.loc[0.01, "status"] == "completed" and 0 <= table.loc[0.01, "test_acc"] <= 100
    md = (sweep_dir / "summary.md").read_text()
    assert "| error |" in md.splitlines()[0] and "lr=-1: must be a positive number" in md
    last = proc.stderr.strip().splitlines()[-1]
    assert "1 of 2 jobs failed" in last and bad.name in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        *TINY,
        "lr=0.01,0.02",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 2 and all(read_results(j)["status"] == "completed" for j in jobs)
    # joblib gives each worker cores // n_jobs threads: together no more than the machine has.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert sum(read_results(j)["threads"] for j in jobs) <= max(cores, 2)
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert sorted(table["lr"]) == [0.01, 0.02] and (table["status"] == "completed").all()


@pytest.mark.parametrize(
    ("override", "named"),
    [("bach_size=1,2", "bach_size"), ("model=lenet5,nope", "model=nope")],
)
def test_unknown_key_or_option_stops_the_sweep_before_any_job(
    tmp_path: Path, override: str, named: str
) -> None:
    proc = run_cli("-m", *TINY, "lr=0.01,0.02", override, cwd=tmp_path)
    assert proc.returncode == 2
    assert named in one_line(proc.stderr)
    assert not (tmp_path / "outputs").exists()


def test_a_mistake_every_job_shares_stops_the_sweep_before_any_job(tmp_path: Path) -> None:
    """A bad value fails its own job only (above); one that no job escapes is one line."""
    proc = run_cli("-m", *TINY, "lr=0.01,0.02", "epochs=-1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "epochs=-1" in one_line(proc.stderr)
    assert not (tmp_path / "outputs").exists()


# In-process: the job wrapper and the folder names.


def job_cfg(**extra: object):
    return OmegaConf.create({"device": "cpu", "dry_run": False, **extra})


def test_run_job_records_a_crash_and_returns(tmp_path: Path) -> None:
    def crash(cfg, out_dir):
        raise RuntimeError("loss is NaN at epoch 3\nmore detail")

    assert sweep.run_job(job_cfg(), tmp_path, 0, crash) == "failed"
    assert read_results(tmp_path) == {"status": "failed", "error": "loss is NaN at epoch 3"}


def test_run_job_keeps_the_failure_run_recorded(tmp_path: Path) -> None:
    def fails_in_training(cfg, out_dir):
        (out_dir / "results.json").write_text(
            json.dumps({"model": "lenet5", "status": "failed", "error": "out of memory"})
        )
        raise MemoryError("out of memory")

    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "error": "stale"}))
    os.utime(tmp_path / "results.json", ns=(0, 0))  # from an earlier attempt
    assert sweep.run_job(job_cfg(), tmp_path, 0, fails_in_training) == "failed"
    assert read_results(tmp_path)["model"] == "lenet5"  # run()'s own record is kept


def test_run_job_replaces_a_stale_record_when_validation_fails(tmp_path: Path) -> None:
    def rejects(cfg, out_dir):
        raise UserError("lr=-1: must be a positive number")

    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "error": "old"}))
    os.utime(tmp_path / "results.json", ns=(0, 0))
    assert sweep.run_job(job_cfg(), tmp_path, 0, rejects) == "failed"
    assert read_results(tmp_path)["error"] == "lr=-1: must be a positive number"


def test_run_job_skips_a_completed_job(tmp_path: Path) -> None:
    calls = []
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed"}))
    assert sweep.run_job(job_cfg(), tmp_path, 0, lambda c, o: calls.append(o)) == "skipped"
    assert calls == []
    (tmp_path / "results.json").write_text(json.dumps({"status": "running"}))
    sweep.run_job(job_cfg(), tmp_path, 0, lambda c, o: calls.append(o) or {"status": "completed"})
    assert calls == [tmp_path]


def test_run_job_lets_ctrl_c_stop_the_sweep(tmp_path: Path) -> None:
    def interrupted(cfg, out_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run_job(job_cfg(), tmp_path, 0, interrupted)


def test_job_dir_name_is_safe_short_and_deterministic() -> None:
    assert sweep.job_dir_name(3, "batch_size=64,lr=0.02") == "3_batch_size=64,lr=0.02"
    assert sweep.job_dir_name(0, "") == "0"
    assert "/" not in sweep.job_dir_name(1, "data.cache_dir=/tmp/x,lr=0.1")
    long_a = sweep.job_dir_name(2, ",".join(f"key{i}=value{i}" for i in range(40)))
    long_b = sweep.job_dir_name(2, ",".join(f"key{i}=value{i}" for i in range(41)))
    assert len(long_a) <= sweep.MAX_JOB_DIR and long_a.startswith("2_key0=value0")
    assert long_a != long_b  # cut names keep a hash of the whole
    assert long_a == sweep.job_dir_name(2, ",".join(f"key{i}=value{i}" for i in range(40)))


def test_config_names_job_folders_and_registers_the_summary_callback() -> None:
    from cifar_run.config.compose import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    hydra = cfg.hydra
    assert OmegaConf.to_container(hydra.sweep)["subdir"].startswith("${cifar_run.job_dir:")
    assert "data.root" in hydra.job.config.override_dirname.exclude_keys
    assert hydra.callbacks.summary._target_ == "cifar_run.outputs.callbacks.SweepSummary"
    assert cfg.threads is None


def test_run_job_resumes_an_interrupted_job_from_its_checkpoint(tmp_path: Path) -> None:
    seen = []
    (tmp_path / "results.json").write_text(json.dumps({"status": "running"}))
    sweep.run_job(job_cfg(resume=False), tmp_path, 0, lambda c, o: seen.append(c.resume))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.pt").write_bytes(b"an epoch's state")
    sweep.run_job(job_cfg(resume=False), tmp_path, 0, lambda c, o: seen.append(c.resume))
    assert seen == [False, True]  # no checkpoint: a fresh start; a checkpoint: resume it


@pytest.mark.slow
def test_rerun_with_a_config_the_folder_names_leave_out_is_refused(
    sweep_copy: tuple, tmp_path: Path, cache_dir: Path
) -> None:
    # data.root is not in the job folder names: skipping the completed jobs would pass off
    # the old data's results as the new data's.
    sweep_dir, args = sweep_copy
    other_root = tmp_path / "other-data"  # the same images in another folder
    shutil.copytree(TEST_DATA, other_root)
    files = sorted(p for p in sweep_dir.rglob("*") if p.is_file())
    before = [p.stat().st_mtime_ns for p in files]

    proc = rerun_into(sweep_dir, args, tmp_path, cache_dir, {"data.root": other_root})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert "data.root" in line and "hydra.sweep.dir" in line
    assert sorted(p for p in sweep_dir.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == before  # nothing touched


@pytest.mark.slow
def test_rerun_with_the_data_folder_spelt_relative_skips_the_completed_jobs(
    sweep_copy: tuple, tmp_path: Path, cache_dir: Path
) -> None:
    sweep_dir, args = sweep_copy
    jobs = job_dirs(sweep_dir)
    stamps = [(j / "results.json").stat().st_mtime_ns for j in jobs]

    relative = os.path.relpath(TEST_DATA, tmp_path)  # the sweep ran with the absolute path
    proc = rerun_into(sweep_dir, args, tmp_path, cache_dir, {"data.root": relative})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipping completed job") == 2
    assert [(j / "results.json").stat().st_mtime_ns for j in jobs] == stamps


def test_dry_run_sweep_checks_every_job_and_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli("-m", "lr=0.01,-1", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.count("parameters: 62006") == 1  # the good job's summary
    assert "lr=-1: must be a positive number" in proc.stderr + proc.stdout
    assert "1 of 2 jobs failed" in proc.stderr and "see the job errors above" in proc.stderr
    assert not (tmp_path / "outputs").exists()
