"""Shared helpers: the committed image subset, in-process config composition, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # 30 train + 20 test JPEGs per class from the real CIFAR-10

# A run over the committed subset: 10 images per class, 10% held out, one quick epoch.
TINY = [
    "data=imagefolder",
    f"data.root={TEST_DATA}",
    "data.subset=10",
    "data.val_size=0.1",
    "epochs=1",
    "batch_size=32",
    "device=cpu",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache per test session, away from the user's ~/.cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_RUN_CACHE", str(cache_dir))


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """The config `cifar-run` would build from these overrides (no Hydra run, no files)."""
    from cifar_run.config.compose import compose_config

    return compose_config(overrides or [])


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus `env`, with src/ put first on PYTHONPATH (prepended, not
    replacing it: packages found through an existing PYTHONPATH must stay found)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), full_env.get("PYTHONPATH")])
    )
    return full_env


def _run(command: list[str], cwd: Path, env: dict[str, str] | None, timeout: float):
    return subprocess.run(
        command, cwd=cwd, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout
    )


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`cifar-run ARGS` in a subprocess, exactly as a user types it."""
    return _run([sys.executable, "-m", "cifar_run", *args], cwd, env, timeout)


def start(
    command: list[str],
    cwd: Path,
    *,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.PIPE,
    **popen: Any,
):
    """`command` started in a subprocess (stderr piped unless given, text) for tests that act
    on it while it runs: kill or interrupt it, close its stdout."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=subprocess_env(),
        stdout=stdout,
        stderr=stderr,
        text=True,
        **popen,
    )


CLI = [sys.executable, "-m", "cifar_run"]  # `cifar-run` as `start` takes it
REPORT = [sys.executable, "-c", "from cifar_run.cli import report_main; report_main()"]


def run_script(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python scripts/NAME ARGS` in a subprocess, as the docs run the benchmarks."""
    return _run([sys.executable, str(REPO / "scripts" / name), *args], cwd, env, timeout)


def run_code(
    code: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
):
    """`python -c CODE ARGS` in a subprocess, with this checkout's src/ first on the path."""
    return _run([sys.executable, "-c", code, *args], cwd, env, timeout)


def run_report(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`cifar-report ARGS` in a subprocess."""
    return run_code("from cifar_run.cli import report_main; report_main()", *args, cwd=cwd)


def one_line(stderr: str) -> str:
    """The one non-blank line a user mistake or a stop leaves on stderr, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    return lines[0]


def read_results(folder: Path) -> dict:
    """The results.json of a run or sweep job folder."""
    return json.loads((folder / "results.json").read_text())


def largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch on two CPU threads for the test, the count before given back after it."""
    from cifar_run.speed.threads import cpu_threads

    with cpu_threads(2):
        yield
