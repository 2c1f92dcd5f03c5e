"""One GPU per running sweep job, on faked CUDA devices (in-process: torch.cuda patched)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cifar_run.outputs import gpus, sweep


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has `n` CUDA devices; waiting jobs look again every 10 ms."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    monkeypatch.setattr(gpus, "POLL_SECONDS", 0.01)
    return make


def job_cfg(device: str = "auto"):
    return OmegaConf.create({"device": device, "dry_run": False, "resume": False})


class Jobs:
    """Sweep jobs run on threads (as parallel workers would), each holding its GPU until told
    to finish; records the device each was given."""

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        self.devices: dict[int, str] = {}
        self.started = {i: threading.Event() for i in range(8)}
        self.finish = {i: threading.Event() for i in range(8)}
        self.threads: dict[int, threading.Thread] = {}

    def start(self, num: int) -> None:
        def fake_run(cfg, out_dir):
            self.devices[num] = cfg.device
            self.started[num].set()
            assert self.finish[num].wait(30)
            return {"status": "completed"}

        folder = self.sweep_dir / f"{num}_job"
        thread = threading.Thread(target=sweep.run_job, args=(job_cfg(), folder, num, fake_run))
        self.threads[num] = thread
        thread.start()

    def end(self, num: int) -> None:
        self.finish[num].set()
        self.threads[num].join(30)
        assert not self.threads[num].is_alive()


def test_parallel_jobs_each_get_a_gpu_of_their_own_and_wait_for_a_free_one(
    tmp_path: Path, fake_gpus, caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpus(2)
    caplog.set_level(logging.INFO, logger="cifar_run")
    jobs = Jobs(tmp_path)
    jobs.start(0)
    jobs.start(1)
    assert jobs.started[0].wait(10) and jobs.started[1].wait(10)
    assert {jobs.devices[0], jobs.devices[1]} == {"cuda:0", "cuda:1"}
    # A third job while both GPUs are busy: it waits (job numbers alone would have sent it
    # to cuda:0, busy with job 0) ...
    jobs.start(2)
    assert not jobs.started[2].wait(0.5)
    # ... and gets the GPU the first job to finish frees, here job 1's.
    jobs.end(1)
    assert jobs.started[2].wait(10) and jobs.devices[2] == "cuda:1"
    jobs.end(0)
    jobs.end(2)
    assert "job 2_job: on GPU 1 of 2 (device=cuda:1)" in caplog.text
    assert "all 2 GPUs are busy" in caplog.text


def test_jobs_one_after_another_spread_over_the_gpus_by_number(tmp_path: Path, fake_gpus) -> None:
    fake_gpus(2)
    seen = []
    for num in range(3):
        sweep.run_job(job_cfg(), tmp_path / f"{num}", num, lambda c, o: seen.append(c.device))
    assert seen == ["cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.parametrize(("count", "device"), [(0, "auto"), (1, "auto"), (4, "cpu"), (4, "cuda:3")])
def test_cpu_one_gpu_or_a_chosen_device_is_left_as_it_is(
    tmp_path: Path, fake_gpus, count: int, device: str
) -> None:
    fake_gpus(count)
    seen = []
    sweep.run_job(job_cfg(device), tmp_path / "0", 0, lambda c, o: seen.append(c.device))
    assert seen == [device]
    assert not (tmp_path / gpus.LEASE_DIR).exists()


@pytest.mark.parametrize(("count", "n_jobs"), [(0, 2), (1, 2), (3, 3)])
def test_the_parallel_launcher_runs_one_job_per_gpu(fake_gpus, count: int, n_jobs: int) -> None:
    from cifar_run.cli import CONF_DIR

    fake_gpus(count)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["hydra/launcher=parallel"], return_hydra_config=True
        )
    assert cfg.hydra.launcher.n_jobs == n_jobs
