"""Optimizers and schedulers from their config groups (`_target_` + `_partial_`).

A schedule is one torch scheduler (or none), optionally preceded by a linear warmup
(LinearLR, joined with SequentialLR), stepped after every batch (`interval: step`) or after
every epoch (`interval: epoch`); ReduceLROnPlateau gets the monitored validation metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import hydra.utils
import torch
from torch.optim.lr_scheduler import LinearLR, SequentialLR

# Keys of an optim/sched entry that describe how we use it rather than constructor arguments.
_OPTIM_META = ("name", "label_smoothing", "grad_clip", "decay_norm_and_bias")
_SCHED_META = ("name", "interval", "warmup_epochs", "warmup_start_factor", "monitor")
# torch's names for the length of a schedule; null in the config means "the rest of the run
# after warmup", counted in the schedule's interval (epochs or batches).
_LENGTH_ARGS = ("T_max", "total_steps")
# ReduceLROnPlateau's mode follows from the metric it watches.
PLATEAU_MODES = {"val_acc": "max", "val_loss": "min"}


def build_optimizer(
    cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer named by the `optim` group, with the top-level learning rate.

    `decay_norm_and_bias: false` puts the one-dimensional tensors (biases, BatchNorm weights)
    into a second parameter group without weight decay ("bag of tricks", He et al. 2019):
    decaying them only pulls the network's scales and offsets towards zero."""
    spec = {k: v for k, v in cfg.items() if k not in _OPTIM_META}
    groups: Iterable[Any] = params
    if not cfg.get("decay_norm_and_bias", True):
        params = list(params)
        decayed = [p for p in params if p.ndim > 1]
        exempt = [p for p in params if p.ndim <= 1]
        groups = [
            g for g in ({"params": decayed}, {"params": exempt, "weight_decay": 0.0}) if g["params"]
        ]
    return hydra.utils.instantiate(spec, _convert_="all")(groups, lr=lr)


@dataclass
class Schedule:
    """A torch scheduler and when to step it.

    `scheduler` is None for a constant learning rate. `warmup` is set only for
    ReduceLROnPlateau, which SequentialLR cannot hold (its step needs the metric): the
    warmup is stepped first, for `warmup_steps` steps, then the plateau scheduler.
    """

    scheduler: Any | None = None
    interval: str = "epoch"
    monitor: str | None = None
    warmup: LinearLR | None = None
    warmup_steps: int = 0

    @property
    def step_batch(self) -> Callable[[], None] | None:
        """The per-batch step for the engine, or None when the schedule steps per epoch."""
        return self._step if self.interval == "step" else None

    def step_epoch(self, metrics: Mapping[str, float]) -> None:
        """Call after validation, with `val_loss` and `val_acc` of the epoch."""
        if self.interval == "epoch":
            self._step(metrics)

    def _step(self, metrics: Mapping[str, float] | None = None) -> None:
        if self.warmup is not None and self.warmup.last_epoch < self.warmup_steps:
            self.warmup.step()
        elif self.monitor is not None:
            if metrics is None:
                raise RuntimeError("a plateau schedule steps per epoch, with the metric")
            self.scheduler.step(metrics[self.monitor])
        elif self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "warmup": None if self.warmup is None else self.warmup.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])


def build_scheduler(
    cfg: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
) -> Schedule:
    """The schedule of the `sched` group for a run of `epochs` x `steps_per_epoch` batches."""
    interval = str(cfg.get("interval", "epoch"))
    unit = steps_per_epoch if interval == "step" else 1  # scheduler steps per epoch
    warmup_steps = int(cfg.get("warmup_epochs", 0)) * unit
    monitor = cfg.get("monitor")

    # Warmup first: its initial step lowers the lr, and SequentialLR restores it anyway.
    warmup = (
        LinearLR(
            optimizer,
            start_factor=float(cfg.get("warmup_start_factor", 0.1)),
            end_factor=1.0,
            total_iters=warmup_steps,
        )
        if warmup_steps
        else None
    )
    spec = {k: v for k, v in cfg.items() if k not in _SCHED_META}
    main = None
    if "_target_" in spec:
        for key in _LENGTH_ARGS:
            if key in spec and spec[key] is None:
                spec[key] = epochs * unit - warmup_steps
        if "milestones" in spec:
            main_epochs = epochs - int(cfg.get("warmup_epochs", 0))
            spec["milestones"] = milestone_epochs(spec["milestones"], main_epochs)
        extra = {"mode": PLATEAU_MODES[monitor]} if monitor is not None else {}
        main = hydra.utils.instantiate(spec, _convert_="all")(optimizer, **extra)

    if monitor is not None:
        return Schedule(main, interval, monitor, warmup, warmup_steps)
    if warmup is not None and main is not None:
        main = SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
    return Schedule(main if main is not None else warmup, interval)


def milestone_epochs(milestones: Iterable[int | float], main_epochs: int) -> list[int]:
    """`sched.milestones` as epochs after warmup: epochs as given, or fractions of the
    `main_epochs` after warmup rounded to the nearest epoch (at least 1), so the default
    [0.5, 0.75] fits a run of any length."""
    values = list(milestones)
    if all(isinstance(m, float) for m in values) and values:
        return [max(1, round(m * main_epochs)) for m in values]
    return [int(m) for m in values]
