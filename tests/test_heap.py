"""The C heap keeps freed memory between training steps (cifar_run.speed.heap).

Nothing is timed: the tests count the minor page faults that re-mapping freed memory costs,
which the settings are there to avoid. Each case runs in a fresh process, since the settings
are process-wide and a heap's history changes what a later allocation costs.
"""

from __future__ import annotations

import platform

import pytest
import torch

from cifar_run.engine.precision import Precision
from cifar_run.speed import heap
from cifar_run.speed import setup as accel

from .conftest import run_code

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Eight 16 MB tensors made and freed per round, as a training step makes and frees its
# activations; the faults of five rounds after two warm-up rounds are printed.
ROUNDS = """
import resource, sys
import torch
from cifar_run.speed import heap
if sys.argv[1] == "kept":
    assert heap.keep_freed_memory(environ={})
def one_round():
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    del blocks
one_round(); one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ROUND = 8 * (16 << 20) // 4096
# glibc told to give every freed block back at once. Its default gives back a varying part of
# them, depending on the heap's history; this is the same behaviour made certain.
GIVE_BACK = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}


def faults(mode: str, tmp_path, env: dict[str, str] | None = None) -> int:
    done = run_code(ROUNDS, mode, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt's settings exist in glibc only")
def test_freed_blocks_are_reused_without_page_faults(tmp_path) -> None:
    given_back = faults("plain", tmp_path, GIVE_BACK)
    kept = faults("kept", tmp_path, GIVE_BACK)  # the settings override the environment's
    assert given_back > 4 * PAGES_PER_ROUND  # every page of the five rounds faulted again
    assert kept < PAGES_PER_ROUND / 2


@pytest.mark.skipif(not GLIBC, reason="mallopt's settings exist in glibc only")
def test_settings_are_made_once_per_process_and_again_without_harm() -> None:
    assert heap.keep_freed_memory(environ={})
    assert heap.keep_freed_memory(environ={})


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    ],
)
def test_a_users_own_malloc_settings_are_left_alone(environ: dict[str, str]) -> None:
    assert not heap.keep_freed_memory(environ=environ)


def test_other_c_libraries_are_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert not heap.keep_freed_memory(environ={})


def test_speed_setup_sets_the_heap_for_the_cpu_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(accel, "keep_freed_memory", lambda: calls.append(1))
    accel.speed_setup(torch.nn.Linear(2, 2), torch.device("cpu"), "fp32")
    assert calls == [1]
    monkeypatch.setattr(accel, "resolve_precision", lambda *a: Precision("fp32", None))
    accel.speed_setup(torch.nn.Linear(2, 2), torch.device("meta"), "fp32")
    assert calls == [1]
