"""CPU thread counts: the process's setting, a count for a block of code, and hooks that run
an optimizer's steps and a model's small ops on one thread.

Under the short OpenMP spin cifar-run sets (cifar_run.constants), a parallel region that
follows a pause first wakes the sleeping threads, which costs more than a small op takes on
one thread (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn


def set_threads(threads: int | None) -> int:
    """Intra-op threads for CPU ops: `threads`, or torch's default (every physical core, or
    OMP_NUM_THREADS when set, as joblib sweeps do) when None. Returns the number in use.

    Inter-op threads stay at one: nothing here runs independent ops side by side, and a
    second pool would only compete for the same cores.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work of the process
        pass
    return torch.get_num_threads()


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """CPU ops inside run on `count` threads; the count in use before comes back on exit.
    A count already in use is not set again: every set clears oneDNN's cache of the
    thread's convolutions."""
    threads = torch.get_num_threads()
    if count != threads:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def one_cpu_thread() -> AbstractContextManager[None]:
    """CPU ops inside run on one thread (`cpu_threads(1)`)."""
    return cpu_threads(1)


def one_thread_steps(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Run `optimizer`'s steps on one CPU thread (hooks around each step; the other ops keep
    every thread). Returns whether the hooks were added (on the CPU, with several threads).

    An optimizer step is one short parallel region per parameter tensor: waking the threads
    for each costs more than sharing a typical tensor's update between them saves (module
    doc).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return False
    before = [threads]  # the count in use when the step began

    def to_one(*_: object) -> None:
        before[0] = torch.get_num_threads()
        if before[0] != 1:  # every set clears oneDNN's cache of the thread's convolutions
            torch.set_num_threads(1)

    def back(*_: object) -> None:
        if before[0] != 1:
            torch.set_num_threads(before[0])

    optimizer.register_step_pre_hook(to_one)
    # Back to the count of before the step (a step that raises leaves one thread, but it
    # ends the run).
    optimizer.register_step_post_hook(back)
    return True


# Elements under which an elementwise op (or a small matrix multiply) runs faster on one thread
# than on two when the second thread sleeps between ops: below it, waking that thread costs
# more than it saves (docs/speed.md).
ONE_THREAD_BELOW = 1 << 19

# Modules worth every thread however small their tensors: many multiply-adds per element, so
# even LeNet-5's small convolutions and pools gain from a second thread (docs/speed.md).
PARALLEL_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def small_ops_on_one_thread(model: nn.Module, device: torch.device) -> bool:
    """Run `model`'s ops on tensors of fewer than ONE_THREAD_BELOW elements on one CPU
    thread, forward and backward, and its convolutions and pools (PARALLEL_MODULES) on
    every thread. Returns whether hooks were added (on the CPU, with several threads, in a
    model with such modules).

    Hooks sit only where the count can change, on the convolutions and pools (a hook on
    every module would cost a small net a noticeable share of its step): before one, every
    thread; after it, the count its output's size asks for, kept by the ops that follow it
    up to the next one. In the backward pass, where its input or output is small, hooks on
    its autograd node do the same: every thread for its own gradient, then the count of its
    input's size for the gradients of the ops before it; elsewhere it keeps every thread (in
    CIFAR nets tensors shrink only at convolutions and pools).

    In LeNet-5 at batch 64 everything but the convolutions and pools goes to one thread; in
    ResNet-18 and ResNet-20 at batch 128 only what follows the last pool (docs/speed.md).
    The count is the one of the time the hooks are added; the last op run leaves its own
    count set, so callers that go on to other work restore theirs.
    """
    threads = torch.get_num_threads()
    parallel = [m for m in model.modules() if isinstance(m, PARALLEL_MODULES)]
    if device.type != "cpu" or threads == 1 or not parallel:
        return False

    def to_one(*_: object) -> None:
        torch.set_num_threads(1)

    def to_all(*_: object) -> None:
        torch.set_num_threads(threads)

    def for_size(x: object) -> Callable[..., None]:
        small = isinstance(x, torch.Tensor) and x.numel() < ONE_THREAD_BELOW
        return to_one if small else to_all

    def first(module: nn.Module, args: tuple) -> None:  # the ops before the first conv
        for_size(args[0] if args else None)()

    def after(module: nn.Module, args: tuple, out: object) -> None:
        following, preceding = for_size(out), for_size(args[0] if args else None)
        following()
        # Node hooks only where the count changes: each has a cost of its own, which a net
        # with nothing small but the classifier (ResNet-20) would pay at every convolution.
        changes = to_one in (following, preceding)
        if changes and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            out.grad_fn.register_prehook(to_all)
            out.grad_fn.register_hook(preceding)

    model.register_forward_pre_hook(first)
    for module in parallel:
        module.register_forward_pre_hook(to_all)
        module.register_forward_hook(after)
    return True
