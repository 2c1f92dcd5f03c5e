"""The `logger` group read back through the real libraries: steps.csv, TensorBoard's event
reader, an MLflow client on the SQLite store and on an `mlflow server`; resume without
duplicated steps; a tracking server that is down; a logger whose package is missing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cifar_run.errors import UserError
from cifar_run.outputs.loggers import settings as logger_settings
from cifar_run.run import run

from .conftest import TINY, compose_cfg, one_line, read_results, run_cli, start
from .test_resume import RESUMABLE, Faulty

NO_BATCH = [a for a in TINY if not a.startswith("batch_size=")]


def steps_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def steps_per_epoch(run_dir: Path) -> int:
    return sum(1 for row in steps_rows(run_dir) if row["epoch"] == "1")


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0: keep every event (the reader samples by default)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def sqlite_client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_names(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_all_loggers_record_a_run_while_a_tracking_server_that_is_down_is_warned_about_once(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_cli(
        *TINY,
        "epochs=2",
        "logger=[csv,tensorboard,mlflow]",
        f"logger.mlflow.tracking_uri={down}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("logger mlflow failed") == 1, output[-3000:]
    assert "Traceback" not in output
    results, epochs = read_results(run_dir), metric_rows(run_dir)
    assert results["status"] == "completed"

    # steps.csv: every step, counted across epochs; an epoch's first step has its lr.
    rows = steps_rows(run_dir)
    per_epoch = steps_per_epoch(run_dir)
    assert list(rows[0]) == ["step", "epoch", "train_loss", "lr"]
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * per_epoch + 1))
    assert [r["epoch"] for r in rows] == ["1"] * per_epoch + ["2"] * per_epoch
    for epoch in epochs:
        first = next(r for r in rows if r["epoch"] == epoch["epoch"])
        assert float(first["lr"]) == pytest.approx(float(epoch["lr"]))
    assert all(0 < float(r["train_loss"]) < 10 for r in rows)

    # TensorBoard's event reader: the scalars, the hparams, the figures.
    acc = events(run_dir)

    step_loss = acc.Scalars("train/loss_step")
    assert [e.step for e in step_loss] == list(range(1, 2 * per_epoch + 1))
    assert [e.value for e in step_loss] == pytest.approx(
        [float(r["train_loss"]) for r in rows], rel=1e-6
    )
    assert len(acc.Scalars("train/lr")) == 2 * per_epoch
    for tag, column in (
        ("val/acc", "val_acc"),
        ("val/loss", "val_loss"),
        ("train/acc", "train_acc"),
    ):
        scalars = acc.Scalars(tag)
        assert [e.step for e in scalars] == [per_epoch, 2 * per_epoch], tag
        assert [e.value for e in scalars] == pytest.approx([float(r[column]) for r in epochs])
    (test_acc,) = acc.Scalars("final/test_acc")
    assert test_acc.value == pytest.approx(results["test_acc"])
    assert acc.Scalars("final/best_val_acc")[0].value == pytest.approx(results["best_val_acc"])

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.01)
    assert hparams["batch_size"].number_value == 32
    assert hparams["model.name"].string_value == "lenet5"
    assert "logger.tensorboard.every_n_steps" not in hparams  # the loggers' own keys stay out
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/test_acc", "final/best_val_acc"} <= metrics
    assert {"figures/loss", "figures/accuracy", "figures/confusion"} <= set(acc.Tags()["images"])


@pytest.mark.slow
def test_mlflow_records_every_job_of_a_parallel_sweep_in_the_sqlite_store(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        *NO_BATCH,
        "epochs=2",
        "logger=[csv,mlflow]",
        "lr=0.01,0.02",
        "batch_size=16,32",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = sqlite_client(tmp_path / "outputs" / "mlflow.db")  # the default store
    experiment = client.get_experiment_by_name(str(sweep_dir))  # one experiment per sweep
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 4 and len(runs) == 4  # one run per job
    seen = set()
    for job in jobs:
        record = json.loads((job / "mlflow.json").read_text())
        run_id = record["run_id"]
        seen.add(run_id)
        found = client.get_run(run_id)
        config = OmegaConf.load(job / "config.yaml")
        assert found.info.status == "FINISHED" and found.info.run_name == job.name
        assert found.data.params["lr"] == str(config.lr)
        assert found.data.params["batch_size"] == str(config.batch_size)
        assert found.data.params["model.name"] == "lenet5"
        per_epoch = steps_per_epoch(job)
        val = history(client, run_id, "val/acc")
        assert [s for s, _ in val] == [per_epoch, 2 * per_epoch]
        assert [v for _, v in val] == pytest.approx([float(r["val_acc"]) for r in metric_rows(job)])
        steps = history(client, run_id, "train/loss_step")
        assert [s for s, _ in steps] == list(range(1, 2 * per_epoch + 1))
        results = read_results(job)
        (test_acc,) = history(client, run_id, "final/test_acc")
        assert test_acc[1] == pytest.approx(results["test_acc"])
        expected = {"results.json", "metrics.csv", "steps.csv", "config.yaml", "confusion.png"}
        assert expected | {"loss.png", "accuracy.png"} <= artifact_names(client, run_id)
    assert seen == {r.info.run_id for r in runs}
    # Where the batch size differs, so does the number of steps an epoch has.
    assert len({steps_per_epoch(job) for job in jobs}) == 2


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer {url} within {seconds} s")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` on a free port of 127.0.0.1, its own SQLite store and artifact folder;
    killed (its whole process group) at the end."""
    port = free_port()
    server = tmp_path / "server"
    server.mkdir()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{server / 'store.db'}",
        "--artifacts-destination",
        str(server / "artifacts"),
        "--workers",
        "1",
    ]
    log = server / "server.log"  # a file, not a pipe: a full pipe would stall the server
    with open(log, "w") as out:
        proc = start(command, server, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, log, seconds=180)
        yield url
    finally:
        # Killed outright: a graceful stop waits for the test's idle keep-alive connections.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_resumed_run_continues_its_run_on_a_tracking_server_without_duplicated_steps(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: run() sets defaults
    run_dir = tmp_path / "run"
    loggers = [
        "logger=[csv,tensorboard,mlflow]",
        f"logger.mlflow.tracking_uri={mlflow_server}",
        "logger.mlflow.experiment=server-test",
    ]
    args = [*RESUMABLE, *loggers]
    per_epoch = 3  # RESUMABLE: 90 training images in batches of 32
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        # The crash comes in the second step of epoch 2, after epoch 1's checkpoint.
        m.setattr("cifar_run.run.build_model", lambda cfg: Faulty(at=per_epoch + 2, fault="crash"))
        run(compose_cfg(args), run_dir)
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    # What the crashed attempt logged: epoch 1, and the first step of epoch 2.
    assert [s for s, _ in history(client, run_id, "train/loss_step")] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in steps_rows(run_dir)] == [1, 2, 3, 4]

    proc = run_cli(*args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logger mlflow failed" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing in the default local store
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id  # the same run
    experiment = client.get_experiment_by_name("server-test")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert found.data.params["lr"] == "0.01" and found.data.params["epochs"] == "3"
    total = 3 * per_epoch
    for key in ("train/loss_step", "train/lr"):
        assert [s for s, _ in history(client, run_id, key)] == list(range(1, total + 1)), key
    assert [s for s, _ in history(client, run_id, "val/acc")] == [3, 6, 9]
    results = read_results(run_dir)
    assert found.data.metrics["final/test_acc"] == pytest.approx(results["test_acc"])
    assert {"results.json", "metrics.csv", "steps.csv", "loss.png"} <= artifact_names(
        client, run_id
    )
    rows = steps_rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    acc = events(run_dir)  # the crashed attempt's event file and the resumed one's, read together
    assert [e.step for e in acc.Scalars("train/loss_step")] == list(range(1, total + 1))
    assert [e.step for e in acc.Scalars("val/acc")] == [3, 6, 9]
    values = [e.value for e in acc.Scalars("train/loss_step")]
    assert values == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-6)


def test_a_logger_whose_package_is_missing_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = logger_settings.importlib.util.find_spec
    monkeypatch.setattr(
        logger_settings.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlflow" else real(name, *a),
    )
    with pytest.raises(UserError) as info:
        logger_settings.check_loggers(compose_cfg(["logger=[csv,mlflow]"]))
    assert str(info.value) == (
        "logger=mlflow: needs the mlflow package, which is not installed: "
        'pip install "cifar-run[track]"'
    )
    logger_settings.check_loggers(compose_cfg(["logger=[csv,tensorboard]"]))  # installed


HIDE_MODULE = """
import importlib.abc, os, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in os.environ["HIDDEN_MODULES"].split(","):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _Hide())
"""


def hidden(tmp_path: Path, *modules: str) -> dict[str, str]:
    """Environment for a subprocess in which `modules` cannot be imported (as if not installed)."""
    site = tmp_path / "hide"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_MODULE)
    return {"PYTHONPATH": str(site), "HIDDEN_MODULES": ",".join(modules)}


def test_cli_without_the_tracking_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    proc = run_cli(
        *TINY, "logger=[csv,tensorboard]", cwd=tmp_path, env=hidden(tmp_path, "tensorboard")
    )
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "logger=tensorboard" in line and 'pip install "cifar-run[track]"' in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("logger.csv.every_n_steps=0", "logger.csv.every_n_steps=0: must be a positive integer"),
        ("logger=[csv,wandb]", "logger=wandb"),
    ],
)
def test_bad_logger_settings_are_one_line(tmp_path: Path, override: str, named: str) -> None:
    proc = run_cli(*TINY, override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert named in one_line(proc.stderr)
