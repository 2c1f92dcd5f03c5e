"""The second half of each training batch in a helper process (cifar_run.speed.halves).

Two Python threads running the halves of a small net's step hand the interpreter lock back
and forth at every op, and each switch also clears oneDNN's cached convolutions, so a half
runs slower beside the other than alone (docs/speed.md). A process has an interpreter of its
own. Its model shares the calling process's parameters and buffers (shared memory, so every
optimizer step is seen without a copy); each step the calling process copies the second half
of the batch into shared buffers, raises a counter, trains its own half and spins until the
helper's counter answers, then reads the helper's gradients, loss and outputs from shared
buffers. The helper computes exactly what the helper thread would (`half_piece.piece` on one
thread), so a step gives the same numbers, to the bit, in either form.

Only for models without BatchNorm or random draws (their halves exchange values within the
step: cifar_run.speed.halves_modules), on Linux on x86-64: the counters rely on x86's
ordering of stores (a buffer written before the counter is seen before it), and the helper
is started with the "spawn" method. The helper starts in the background, once a model has
trained a few steps in halves (a short run never pays for its start); until it is ready the
halves run on two threads, which give the same numbers.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
import traceback
import types
import weakref
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from torch import nn

# Slots of the shared control vector (int64).
READY, GO, DONE, FAILED, ROWS, BATCH, AUTOCAST, LOADED = range(8)
AUTOCASTS: list[torch.dtype | None] = [None, torch.bfloat16, torch.float16]

SPIN_SECONDS = 0.01  # how long the helper spins for the next step before it polls asleep
NAP_SECONDS = 0.001  # the helper's poll interval asleep, for the first IDLE_SECONDS
IDLE_SECONDS = 1.0
LONG_NAP_SECONDS = 0.01  # and after that (an evaluation, a checkpoint)
LOAD_SECONDS = 120.0  # how long the calling process waits for the helper to take a model
ALIVE_EVERY = 1 << 16  # spins between checks that the helper still runs
# Spins (each a fraction of a microsecond) after which a wait gives its core to any other
# runnable thread at every spin: with more threads than cores (a busy machine, `threads`
# above the cores) the helper may be waiting for this one.
YIELD_AFTER = 1 << 14


def available() -> bool:
    """Whether this platform can run a half in a helper process (Linux, x86-64)."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def suits(model: nn.Module) -> bool:
    """Whether `model`'s halves are independent within a step: no norm layer (BatchNorm
    exchanges statistics between the halves) and no dropout (a generator per half)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.modules.dropout._DropoutNd):
            return False
    return True


class HelperGone(RuntimeError):
    """The helper process stopped (killed, or out of memory) while it held a step."""


@dataclass
class _Loaded:
    """What the helper holds now, and the shared buffers of a step."""

    key: tuple
    x: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor]
    has_grad: torch.Tensor  # uint8 per gradient: whether the helper's was not None


class HalfProcess:
    """A helper process that trains the second half of a batch with `threads` CPU threads."""

    def __init__(self, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self._control = torch.zeros(8, dtype=torch.int64).share_memory_()
        self._c = self._control.numpy()
        self._inbox = ctx.SimpleQueue()  # models and buffers, to the helper
        self._errors = ctx.SimpleQueue()  # the helper's tracebacks
        self._process = ctx.Process(
            target=_serve,
            args=(self._control, self._inbox, self._errors, threads, os.getpid()),
            name="cifar-run-half",
            daemon=True,
        )
        _start_without_main(self._process)
        self._loaded: _Loaded | None = None
        self._step = 0
        self._finalizer = weakref.finalize(self, _stop, self._process, self._inbox)

    @property
    def ready(self) -> bool:
        """Whether the helper has started and imported torch (it never blocks)."""
        return bool(self._c[READY]) and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def models_taken(self) -> int:
        """How many times the helper has taken a model."""
        return int(self._c[LOADED])

    @property
    def loaded(self) -> bool:
        """Whether the helper holds a model (and still runs)."""
        return self._loaded is not None and self._process.is_alive()

    def holds(self, key: tuple, rows: int) -> bool:
        """Whether the helper holds the model, criterion and buffers `key` names (see
        `load`), with room for `rows` rows."""
        loaded = self._loaded
        return loaded is not None and rows <= loaded.x.shape[0] and loaded.key == key

    def load(
        self,
        key: tuple,
        model: nn.Module,
        criterion: object,
        x: torch.Tensor,
        y: torch.Tensor,
        out: torch.Tensor,
        loss: torch.Tensor,
        grads: list[torch.Tensor | None],
    ) -> bool:
        """Give the helper `model`, whose parameters and buffers must be in shared memory
        (Module.share_memory: the helper's copy then sees every update), and `criterion`,
        with buffers for a half like `x`, `y` whose outputs, loss and gradients are like
        `out`, `loss`, `grads` (a thread's half of the same step). `key` names what the copy
        depends on, for `holds` (the caller knows what that is). Returns whether the helper
        took them (False for a model or criterion that cannot be pickled, and if the
        helper has stopped)."""
        self._loaded = None
        loaded = _Loaded(
            key=key,
            x=torch.empty_like(x).share_memory_(),
            y=torch.empty_like(y).share_memory_(),
            out=torch.empty_like(out).share_memory_(),
            loss=torch.empty_like(loss).share_memory_(),
            grads=[
                torch.zeros(0) if g is None else torch.empty_like(g).share_memory_() for g in grads
            ],
            has_grad=torch.zeros(len(grads), dtype=torch.uint8).share_memory_(),
        )
        generation = int(self._c[LOADED]) + 1
        try:
            self._inbox.put((generation, model, criterion, loaded))
        except Exception:  # noqa: BLE001 - an unpicklable model or criterion: threads
            return False
        deadline = time.monotonic() + LOAD_SECONDS
        while self._c[LOADED] < generation:
            if not self._process.is_alive() or time.monotonic() > deadline:
                return False
            time.sleep(NAP_SECONDS)
        if self._c[FAILED]:
            self._c[FAILED] = 0
            return False
        self._loaded = loaded
        return True

    def start(
        self, x: torch.Tensor, y: torch.Tensor, batch: int, autocast: torch.dtype | None
    ) -> None:
        """Start the helper on half `x`, `y` of a batch of `batch` rows (it must `hold` the
        model for them)."""
        loaded = self._loaded
        assert loaded is not None
        rows = x.shape[0]
        loaded.x[:rows].copy_(x)
        loaded.y[:rows].copy_(y)
        self._c[ROWS] = rows
        self._c[BATCH] = batch
        self._c[AUTOCAST] = AUTOCASTS.index(autocast)
        self._step += 1
        self._c[GO] = self._step  # last: x86 makes the writes above visible before it

    def result(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Wait for the helper's half: its loss, outputs and gradients, as views of the
        shared buffers (valid until the next `start`)."""
        spins = 0
        while self._c[DONE] < self._step:
            spins += 1
            if spins > YIELD_AFTER:  # a long wait: the helper may want this core
                os.sched_yield()
            if spins % ALIVE_EVERY == 0 and not self._process.is_alive():
                self._loaded = None
                raise HelperGone(
                    f"batch halves: the helper process stopped (exit code {self._process.exitcode})"
                )
        loaded = self._loaded
        assert loaded is not None
        if self._c[FAILED]:
            self._c[FAILED] = 0
            self._loaded = None
            message = self._errors.get() if not self._errors.empty() else "(no message)"
            raise RuntimeError(f"batch halves: the helper process failed:\n{message}")
        grads = [
            g if has else None
            for g, has in zip(loaded.grads, loaded.has_grad.tolist(), strict=True)
        ]
        return loaded.loss, loaded.out[: int(self._c[ROWS])], grads

    def close(self) -> None:
        self._finalizer()


def _start_without_main(process: mp.Process) -> None:
    """Start `process` without the calling program's main module: "spawn" runs the main
    script again in the child (as `__mp_main__`) so that its functions can be unpickled,
    which would repeat a script's unguarded top-level code (even its training) and needs
    the `if __name__ == "__main__"` idiom in every caller. The helper's function lives in
    this module, so it needs nothing of the main one; the child is prepared while `start`
    runs, so only that moment sees a stand-in."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = main


def _stop(process: mp.Process, inbox: object) -> None:
    if process.is_alive():
        try:
            inbox.put(None)
        except (OSError, ValueError):
            pass
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _serve(control: torch.Tensor, inbox: object, errors: object, threads: int, parent: int) -> None:
    """The helper's loop: take models from `inbox`, train a half for each step."""
    from cifar_run.speed.half_piece import MaskedWeights, piece
    from cifar_run.speed.heap import keep_freed_memory  # the same heap as the calling process

    # Ctrl-C in a terminal reaches the whole process group: the calling process handles it
    # and closes the helper (or leaves, which the helper notices), never a traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    torch.set_num_threads(threads)
    c = control.numpy()
    c[READY] = 1
    step = 0
    model = criterion = loaded = None
    while True:
        # Spin for the next step, then poll asleep; take a new model when one comes.
        began = time.monotonic()
        spins = 0
        while c[GO] <= step:
            spins += 1
            if spins < 1 << 10:
                continue
            spins = 0
            os.sched_yield()  # as the caller's wait does, for a machine with fewer cores
            if not inbox.empty():
                message = inbox.get()
                if message is None:
                    return
                generation, model, criterion, loaded = message
                model.train()
                c[LOADED] = generation
                began = time.monotonic()
                continue
            idle = time.monotonic() - began
            if idle < SPIN_SECONDS:
                continue
            if os.getppid() != parent:  # the calling process is gone
                return
            time.sleep(NAP_SECONDS if idle < IDLE_SECONDS else LONG_NAP_SECONDS)
        step = int(c[GO])
        try:
            rows, batch = int(c[ROWS]), int(c[BATCH])
            masked = MaskedWeights(model)
            wanted = [masked.leaf(p) for p in model.parameters() if p.requires_grad]
            with masked:
                loss, out, grads = piece(
                    model,
                    criterion,
                    loaded.x[:rows],
                    loaded.y[:rows],
                    rows / batch,
                    AUTOCASTS[int(c[AUTOCAST])],
                    wanted,
                    None,
                )
            loaded.loss.copy_(loss)
            loaded.out[:rows].copy_(out)
            for i, (buffer, g) in enumerate(zip(loaded.grads, grads, strict=True)):
                loaded.has_grad[i] = g is not None
                if g is not None:
                    buffer.copy_(g)
        except BaseException:  # noqa: BLE001 - reported to the calling process
            errors.put(traceback.format_exc())
            c[FAILED] = 1
        c[DONE] = step
