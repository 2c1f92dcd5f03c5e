"""The second half of each batch in a helper process (cifar_run.speed.halves_process): the same
numbers, to the bit, as the helper thread; a model that changes (pruning) is taken again;
errors reach the caller; the helper never outlives its caller."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from cifar_run.engine.loop import train_one_epoch
from cifar_run.models.lenet import LeNet5
from cifar_run.prune.masks import apply_global_l1, prunable_parameters
from cifar_run.speed import halves_process as split_process
from cifar_run.speed.halves import BatchSplit

from .conftest import REPO, subprocess_env

CPU = torch.device("cpu")
WAIT_SECONDS = 120.0  # for the helper to start: a fresh interpreter importing torch

pytestmark = pytest.mark.skipif(
    not split_process.available(), reason="helper processes: Linux on x86-64 only"
)


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g)


def _in_process(split: BatchSplit, model: nn.Module, criterion: Callable = F.cross_entropy) -> None:
    """Train steps (of throwaway gradients) until the helper process holds `model`."""
    deadline = time.monotonic() + WAIT_SECONDS
    x, y = _batch(16, seed=99)
    while not split.in_process:
        assert time.monotonic() < deadline, "the helper process never took the model"
        split.forward_backward(model, criterion, x, y)
        time.sleep(0.02)
    model.zero_grad(set_to_none=True)


class _Pair:
    """The same model twice (same weights), one split with a helper thread, one with a
    helper process, each with its own SGD optimizer."""

    def __init__(self, criterion: Callable = F.cross_entropy) -> None:
        self.criterion = criterion
        self.models, self.optimizers, self.splits = [], [], []
        for processes in (False, True):
            torch.manual_seed(0)
            model = LeNet5()
            split = BatchSplit(2, processes=processes, process_after=0)
            assert split.prepare(model)
            self.models.append(model)
            self.optimizers.append(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
            self.splits.append(split)

    def step(self, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None) -> list:
        """One training step of each: (loss, outputs, gradients) per arm."""
        results = []
        for model, optimizer, split in zip(self.models, self.optimizers, self.splits, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss, out = split.forward_backward(model, self.criterion, x, y, autocast=autocast)
            results.append((loss, out, [p.grad.clone() for p in model.parameters()]))
            optimizer.step()
        return results

    def close(self) -> None:
        for split in self.splits:
            split.close()


def _same(a: tuple, b: tuple) -> bool:
    (loss, out, grads), (loss2, out2, grads2) = a, b
    return (
        torch.equal(loss, loss2)
        and torch.equal(out, out2)
        and all(torch.equal(g, h) for g, h in zip(grads, grads2, strict=True))
    )


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_helper_process_gives_the_helper_threads_numbers_to_the_bit(
    autocast: torch.dtype | None, two_threads: None
) -> None:
    pair = _Pair()
    _in_process(pair.splits[1], pair.models[1])
    # Steps with optimizer updates in between: the helper sees each update of the caller's
    # weights (shared memory), and a smaller last batch fits the buffers made for 32 rows.
    for n, seed in [(64, 0), (64, 1), (63, 2), (64, 3), (20, 4)]:
        thread, process = pair.step(*_batch(n, seed), autocast)
        assert pair.splits[1].in_process
        assert _same(thread, process), f"batch of {n}"
    for a, b in zip(pair.models[0].parameters(), pair.models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    pair.close()


def test_a_model_pruned_between_steps_is_taken_again(two_threads: None) -> None:
    pair = _Pair()
    _in_process(pair.splits[1], pair.models[1])
    assert _same(*pair.step(*_batch(64, 0), None))
    helper = pair.splits[1]._process
    taken = helper.models_taken
    for model in pair.models:  # torch's masks: new buffers and weight_orig parameters
        apply_global_l1(prunable_parameters(model), 0.5)
    for seed in (1, 2):
        assert _same(*pair.step(*_batch(64, seed), None))
    assert helper.models_taken == taken + 1 and pair.splits[1].in_process
    pruned = [m for m in pair.models[1].modules() if hasattr(m, "weight_mask")]
    assert pruned
    for module in pruned:  # a pruned weight's gradient is zero where its mask is
        assert torch.all(module.weight_orig.grad[module.weight_mask == 0] == 0)
    for model in pair.models:  # the masks made permanent: new weight parameters
        for module in model.modules():
            if hasattr(module, "weight_mask"):
                prune.remove(module, "weight")
    pair.optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in pair.models]
    for seed in (3, 4):
        assert _same(*pair.step(*_batch(64, seed), None))
    assert helper.models_taken == taken + 2 and pair.splits[1].in_process
    pair.close()


def test_training_an_epoch_with_the_helper_process_equals_the_helper_thread(
    two_threads: None,
) -> None:
    weights = []
    for processes in (False, True):
        torch.manual_seed(0)
        model = LeNet5()
        split = BatchSplit(2, processes=processes, process_after=0)
        criterion = nn.CrossEntropyLoss()
        if processes:
            assert split.prepare(model)
            _in_process(split, model, criterion)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = [_batch(32, seed) for seed in range(6)]
        stats = train_one_epoch(model, batches, optimizer, criterion, device=CPU, steps=split)
        assert stats.images == 32 * 6 and stats.loss > 0
        assert split.in_process == processes
        # Its steps kept this thread at one CPU thread; the epoch gives both back.
        assert torch.get_num_threads() == 2
        weights.append([p.detach().clone() for p in model.parameters()])
        split.close()
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_helper_process_killed_mid_run_hands_the_halves_back_to_the_thread(
    two_threads: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = _Pair()
    with caplog.at_level(logging.INFO, logger="cifar_run.speed.halves"):
        _in_process(pair.splits[1], pair.models[1])
    assert "a helper process (pid" in caplog.text
    assert _same(*pair.step(*_batch(64, 0), None))
    helper = pair.splits[1]._process
    os.kill(helper.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    helper._process.join(timeout=10)
    # A step that started before the death was seen finds it gone while it waits.
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, "cifar_run.speed.halves"):
        patch.setattr(split_process.HalfProcess, "ready", property(lambda self: True))
        assert _same(*pair.step(*_batch(64, 1), None))
    assert "the helper process stopped (exit code -9); the second halves go back" in caplog.text
    # And the steps after it: on the thread, the same numbers, no second helper.
    for seed in (2, 3):
        assert _same(*pair.step(*_batch(64, seed), None))
    assert not pair.splits[1].in_process
    assert pair.splits[1]._process is helper
    pair.close()


def test_a_helper_process_killed_during_a_step_is_noticed_in_that_step(
    two_threads: None,
) -> None:
    pair = _Pair()
    _in_process(pair.splits[1], pair.models[1])
    helper = pair.splits[1]._process
    x, y = _batch(16, 0)  # the buffers' size: _in_process's batches
    os.kill(helper.pid, signal.SIGSTOP)  # so that it cannot answer before it dies
    helper.start(x[8:], y[8:], 16, None)
    os.kill(helper.pid, signal.SIGKILL)
    with pytest.raises(split_process.HelperGone, match="exit code -9"):
        helper.result()
    pair.close()


def test_an_unpicklable_criterion_keeps_the_helper_thread(two_threads: None) -> None:
    pair = _Pair(criterion=lambda out, y: F.cross_entropy(out, y))  # a lambda: no pickle
    for seed in range(3):
        assert _same(*pair.step(*_batch(32, seed), None))
    deadline = time.monotonic() + WAIT_SECONDS
    while not pair.splits[1]._process.ready:  # started, but never holds the model
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _same(*pair.step(*_batch(32, 3), None))
    assert not pair.splits[1].in_process
    pair.close()


class FailsInAHelperProcess(nn.Module):
    """Raises in any process but the one that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()
        self.linear = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() != self.pid:
            raise ValueError("boom in the helper process")
        return self.linear(x.flatten(1))


def test_an_error_in_the_helper_process_reaches_the_caller(two_threads: None) -> None:
    model = FailsInAHelperProcess()
    split = BatchSplit(2, process_after=0)
    assert split.prepare(model)
    _in_process(split, model)  # loaded by a step on the thread; its first own step fails
    with pytest.raises(RuntimeError, match="boom in the helper process"):
        split.forward_backward(model, F.cross_entropy, *_batch(8))
    # The next step runs on the thread again and gives the model back to the helper.
    split.forward_backward(model, F.cross_entropy, *_batch(8))
    assert split.in_process
    split.close()


def test_models_with_batchnorm_or_dropout_keep_the_helper_thread() -> None:
    assert split_process.suits(LeNet5())
    assert not split_process.suits(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert not split_process.suits(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 32, 32))
    split = BatchSplit(2, process_after=0)
    assert split.prepare(model)
    for _ in range(3):
        split.forward_backward(model, F.cross_entropy, *_batch(8))
    assert split._process is None
    split.close()


def test_the_helper_leaves_with_its_caller_and_never_reruns_the_callers_script(
    tmp_path: Path,
) -> None:
    # A script without the `if __name__ == "__main__"` idiom: "spawn" would run it again in
    # the helper. The script is killed without any clean-up of its own.
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, time
            from cifar_run.speed.halves_process import HalfProcess
            print("top level", flush=True)
            helper = HalfProcess(1)
            while not helper.ready:
                time.sleep(0.02)
            print("helper", helper._process.pid, flush=True)
            os.kill(os.getpid(), 9)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.count("top level") == 1, proc.stdout + proc.stderr
    helper = int(proc.stdout.split("helper")[1].split()[0])
    deadline = time.monotonic() + 10
    while _alive(helper):
        assert time.monotonic() < deadline, "the helper outlived its caller"
        time.sleep(0.05)


def test_close_stops_the_helper(two_threads: None) -> None:
    model = LeNet5()
    split = BatchSplit(2, process_after=0)
    assert split.prepare(model)
    _in_process(split, model)
    process = split._process._process
    split.close()
    assert not process.is_alive()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its new parent) counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
