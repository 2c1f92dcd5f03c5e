"""A training batch's forward and backward as two halves, run side by side on two threads.

On a 2-core CPU a small conv net such as LeNet-5 uses its second core poorly: each of its
ops is a short parallel region, and waking the second thread for it costs about as much as
it saves. Two halves of the batch on two Python
threads, each op on one core, keep both cores busy instead: torch releases the GIL inside
every op, and autograd runs a CPU graph's backward on the thread that asks for it
(docs/speed.md).

The gradient is the whole batch's: each half's loss is weighted by its share of the batch,
and the second half's gradients are added to the first's after both are done, in that fixed
order, so that a run repeats bit for bit (the sum differs from the whole batch's only in
rounding). BatchNorm layers swap their statistics between the halves, so that each
normalizes with the whole batch's, and dropout draws from a generator per half
(cifar_run.speed.halves_modules). A pruned model's masked weights (torch.nn.utils.prune, whose
forward pre-hooks would set the weight on the shared module from both threads) are taken
once per step on the calling thread, as leaves both halves use, and their gradient goes
through the mask to the unpruned weight after both are done, as autograd would take it
(`MaskedWeights`). What else makes halves valid is that the model keeps no other per-call
state: `suits` refuses other norm and dropout layers.

For a model without BatchNorm or dropout, a helper process takes the second halves once it
has started (cifar_run.speed.halves_process): the two threads' handoffs of the GIL cost a
small net's step more than the process's shared-memory exchange.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from cifar_run.speed import halves_process
from cifar_run.speed.half_piece import MaskedWeights, add_grad, piece
from cifar_run.speed.halves_modules import RANDOM, Half, HalfStopped, Swap, for_halves
from cifar_run.speed.interface import PLAIN, ForwardBackward
from cifar_run.speed.threads import cpu_threads

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_log = logging.getLogger(__name__)


def suits(model: nn.Module) -> bool:
    """Whether halves of a batch give `model` the gradient of the whole batch: no norm
    layer but BatchNorm2d, no dropout but Dropout and Dropout2d. Pruned models
    (torch.nn.utils.prune) suit, in any precision."""
    for module in model.modules():
        if isinstance(module, _NormBase) and not isinstance(module, nn.BatchNorm2d):
            return False
        if isinstance(module, _DropoutNd) and module.p > 0:
            if not isinstance(module, nn.Dropout | nn.Dropout2d):
                return False
    return True


# Multiply-adds per weight per image under which halves do not pay: each half computes every
# weight's gradient from half the rows, and a net whose weights meet few output pixels
# (torchvision's ResNet-18 on 32x32 images, its maps 8x8 down to 1x1) spends its step on
# those gradients rather than on its activations, so the halves add work instead of sharing
# it (docs/speed.md).
MIN_WEIGHT_REUSE = 8.0


def weight_reuse(model: nn.Module, image_shape: tuple[int, ...] = (3, 32, 32)) -> float:
    """Multiply-adds per weight per image in `model`'s convolutions and linear layers: the
    mean, over their weights, of the output pixels each weight is applied at. Measured with
    one forward pass of a blank image in eval mode (no statistics, no random draws)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        return math.inf
    seen: list[tuple[int, int]] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        pixels = out.shape[2] * out.shape[3] if isinstance(module, nn.Conv2d) else 1
        seen.append((module.weight.numel(), pixels))

    modes = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(record) for m in layers]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    except (RuntimeError, ValueError, TypeError):
        return math.inf  # not an image classifier of this shape: leave the choice to `suits`
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    weights = sum(w for w, _ in seen)
    return sum(w * p for w, p in seen) / weights if weights else math.inf


# Steps in halves before a helper process starts: a shorter run never pays for its start.
PROCESS_AFTER = 200


class BatchSplit:
    """Forward and backward of each training batch as two halves on two threads: the
    calling thread takes the first half with `threads - threads // 2` CPU threads, a helper
    thread the second with `threads // 2` (at least one each).

    `processes`: once a model that suits (halves_process.suits) has trained `process_after`
    steps in halves, a helper process starts in the background and, when ready, takes the
    second halves in place of the helper thread (the same numbers, to the bit)."""

    def __init__(
        self, threads: int, processes: bool = True, process_after: int = PROCESS_AFTER
    ) -> None:
        self.main_threads = max(1, threads - threads // 2)
        self.helper_threads = max(1, threads // 2)
        self._processes = processes and halves_process.available()
        self._process_after = process_after
        self._steps = 0  # in halves, of models that suit a helper process
        self._process: halves_process.HalfProcess | None = None
        # torch's CPU thread count is per thread: the helper sets its own once, here, before
        # anything runs beside it (setting it also resets a oneDNN cache). Setting a count
        # also changes torch's process-wide default, which a thread takes as its count when
        # it first asks for one or runs a parallel op: so this thread asks first, and gets
        # the default back after the helper's set.
        here = torch.get_num_threads()
        self._helper = ThreadPoolExecutor(
            1,
            thread_name_prefix="cifar-run-half",
            initializer=_own_threads,
            initargs=(self.helper_threads,),
        )
        self._helper.submit(int).result()
        torch.set_num_threads(here)
        # Prepared models, and whether each draws random numbers (dropout).
        self._draws: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        # And whether each suits a helper process (halves_process.suits).
        self._process_suits: weakref.WeakKeyDictionary[nn.Module, bool] = (
            weakref.WeakKeyDictionary()
        )

    def prepare(self, model: nn.Module) -> bool:
        """Whether `model` can train in halves (`suits`); if so, its BatchNorm2d and
        dropout modules get their split-step behaviour (halves_modules.for_halves, in place;
        outside a split step they behave as plain BatchNorm2d and dropout)."""
        if not suits(model):
            return False
        for_halves(model)
        self._draws[model] = any(isinstance(m, RANDOM) for m in model.modules())
        self._process_suits[model] = halves_process.suits(model)
        return True

    @property
    def wants_process(self) -> bool:
        """Whether a helper process will take the second halves of the models prepared."""
        return self._processes and any(self._process_suits.values())

    @property
    def in_process(self) -> bool:
        """Whether the helper process has taken a model's halves (and still holds one)."""
        return self._process is not None and self._process.loaded

    def _helper_process(self, model: nn.Module) -> halves_process.HalfProcess | None:
        """The helper process, if `model` may use it and it is ready; starts it once the
        model has trained enough steps."""
        if not (self._processes and self._process_suits[model]):
            return None
        if self._process is None:
            self._steps += 1
            if self._steps <= self._process_after:
                return None
            self._process = halves_process.HalfProcess(self.helper_threads)
        return self._process if self._process.ready else None

    @contextmanager
    def epoch(
        self,
        model: nn.Module,
        autocast: torch.dtype | None,
        scaler: torch.amp.GradScaler | None,
    ) -> Iterator[ForwardBackward]:
        """The training loop's step function for one epoch (speed.interface): halves where
        the model suits, else the plain step. Looked at once per epoch: the pruning stage
        fine-tunes, pruned, a model whose dense epochs ran in halves. The thread count in
        use comes back after the epoch (a step with the helper process changes it)."""
        if scaler is not None or not self.prepare(model):
            with PLAIN.epoch(model, autocast, scaler) as step:
                yield step
            return

        def step(criterion: Criterion, x: torch.Tensor, y: torch.Tensor) -> tuple:
            return self.forward_backward(model, criterion, x, y, autocast=autocast)

        with cpu_threads(torch.get_num_threads()):
            yield step

    def forward_backward(
        self,
        model: nn.Module,
        criterion: Criterion,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        autocast: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of `criterion(model(x), y)` (a mean over the batch), the
        gradients left in the parameters' `.grad` as `loss.backward()` would leave them
        (added to what is there). Returns the batch's loss and the model's outputs, both
        detached. A batch of one image runs whole on the calling thread. The model must be
        `prepare`d.

        A step with the helper process leaves the calling thread at its share of the CPU
        threads (`main_threads`), for the rest of the training step and the next batch:
        with every thread they would wake a second OpenMP thread on the core the helper runs
        on, slowing both. `epoch` sets the count back after the epoch."""
        if model not in self._draws:
            raise ValueError("BatchSplit.forward_backward: prepare(model) first")
        n = x.shape[0]
        if n < 2:
            return piece(model, criterion, x, y, 1.0, autocast, None, None)
        half = (n + 1) // 2
        masked = MaskedWeights(model)
        params = [p for p in model.parameters() if p.requires_grad]
        swap = Swap()
        # Each half's random draws from a generator of its own, seeded here, on the calling
        # thread, from torch's global one: the same seed gives the same run.
        generators: list[torch.Generator | None] = [None, None]
        if self._draws[model]:
            seeds = torch.randint(1 << 62, (2,)).tolist()
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        halves = [Half(swap, rank, g) for rank, g in enumerate(generators)]
        first = (model, criterion, x[:half], y[:half], half / n, autocast, None, halves[0])
        wanted = [masked.leaf(p) for p in params]  # the helper's: masked weights as leaves
        second = (model, criterion, x[half:], y[half:], (n - half) / n, autocast, wanted, halves[1])
        # The helper process, if it holds this model; else the one to give it to, if any.
        process, process_to_load = self._helper_process(model), None
        if process is not None:
            key = _process_key(model, criterion, params, masked, x[half:], y[half:])
            if not process.holds(key, n - half):
                process, process_to_load = None, process
        # Set while the helper is idle, as above, and restored once it is again; with a
        # helper process, kept (see `forward_backward`'s doc).
        threads = nullcontext() if process is not None else cpu_threads(self.main_threads)
        if process is not None and torch.get_num_threads() != self.main_threads:
            torch.set_num_threads(self.main_threads)
        with masked, threads:
            if process is not None:
                loss, out, loss2, out2, grads = _with_process(process, first, second, n)
            else:
                loss, out, loss2, out2, grads = _with_thread(self._helper, first, second)
            # On this thread's share of the threads: on every thread the add of a gradient
            # past torch's grain size (LeNet-5's largest) would first wake the other thread,
            # which costs more than the add itself.
            # (The helper process's are views of its buffers, copied where kept.)
            for p, g in zip(wanted, grads, strict=True):
                add_grad(p, g, copy=process is not None)
            masked.to_unpruned()
        if process_to_load is not None:  # outside `masked`: the model as it stands
            model.share_memory()  # in place; the tensors move, so the key is taken again
            key = _process_key(model, criterion, params, masked, x[half:], y[half:])
            taken = process_to_load.load(
                key, model, criterion, x[half:], y[half:], out2, loss2, grads
            )
            if taken and process_to_load.models_taken == 1:
                _log.info(
                    "batch halves: a helper process (pid %d) takes the second halves",
                    process_to_load.pid,
                )
        return loss + loss2, torch.cat([out, out2])

    def close(self) -> None:
        self._helper.shutdown()
        if self._process is not None:
            self._process.close()


def _with_thread(helper: ThreadPoolExecutor, first: tuple, second: tuple) -> tuple:
    """The first half here, the second on the helper thread: both losses and outputs, and
    the second's gradients."""
    future = helper.submit(piece, *second)
    try:
        try:
            loss, out = piece(*first)
        except HalfStopped:
            wait([future])
            future.result()  # the helper's own error: it stopped first
            raise
        loss2, out2, grads = future.result()
    finally:
        # Never leave the helper running on the model past an error in this thread.
        wait([future])
    return loss, out, loss2, out2, grads


def _with_process(
    process: halves_process.HalfProcess, first: tuple, second: tuple, batch: int
) -> tuple:
    """As _with_thread, with the second half in the helper process (which holds the model)."""
    _, _, x2, y2, _, autocast, _, _ = second
    process.start(x2, y2, batch, autocast)
    try:
        loss, out = piece(*first)
    except BaseException:
        try:  # never leave the helper running on the model past an error here
            process.result()
        except RuntimeError:
            pass  # this thread's error is the one to report
        raise
    try:
        loss2, out2, grads = process.result()
    except halves_process.HelperGone as gone:
        # The same numbers on this thread; the split finds the helper gone from now on
        # (HalfProcess.ready) and gives the next halves to its helper thread.
        _log.warning("%s; the second halves go back to a helper thread", gone)
        loss2, out2, grads = piece(*second)
    return loss, out, loss2, out2, grads


def _own_threads(count: int) -> None:
    """Give the calling thread `count` CPU threads for good. It asks for its count first:
    torch sets a thread's count from its process-wide default when the thread first asks or
    runs a parallel op, and by the helper's first op the calling thread's settings have moved
    that default (with 3 threads the helper then ran on 2, not 1)."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def _process_key(
    model: nn.Module,
    criterion: Criterion,
    params: list[torch.Tensor],
    masked: MaskedWeights,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple:
    """What a helper process's copy of `model` depends on: the tensors it trains and their
    masks (pruning adds and replaces both: so does the end of pruning), the criterion and
    the layout of a second half (rows aside). Models there have no other buffers that
    change (halves_process.suits: no norm layers)."""
    return (
        id(model),
        id(criterion),
        tuple((p.data_ptr(), p.shape) for p in params),
        masked.masks(),
        tuple((t.shape[1:], t.dtype, t.stride()[1:]) for t in (x, y)),
    )
