"""Tracker: one run's loggers behind one object that never stops the training.

run.py builds it from the config, opens it once the resume point is known, and calls it from
the epoch callback and at the end; the training loop only sees `on_step`, a StepHook. A logger
that raises (a tracking server gone, a full disk) is warned about once and dropped: the run
goes on, and its folder's CSV files stay the record.

Steps are numbered across epochs: step s of epoch e is (e - 1) * steps_per_epoch + s, and an
epoch's values are logged at its last step, so every logger has one axis. A resumed run starts
after the checkpoint's last step, and each logger drops or hides what it had logged past it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cifar_run.outputs.loggers.base import EPOCH_METRICS, FINAL_METRICS, Logger, Start
from cifar_run.outputs.loggers.settings import flat_config, selected

log = logging.getLogger(__name__)

# At most this often the collected step losses are read from the device (one host
# synchronisation) and handed to the loggers: a few times a second.
FLUSH_SECONDS = 0.5


def _open(name: str, start: Start) -> Logger:
    # Imported here: each module imports its library, which only a chosen logger needs.
    if name == "csv":
        from cifar_run.outputs.loggers.steps_csv import StepsCsv

        return StepsCsv(start)
    if name == "tensorboard":
        from cifar_run.outputs.loggers.tensorboard import TensorBoardLogger

        return TensorBoardLogger(start)
    from cifar_run.outputs.loggers.mlflow_run import MLflowLogger

    return MLflowLogger(start)


def _numbers(values: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for name, key in names.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Tracker:
    """The chosen loggers of one run (none: every call does nothing)."""

    def __init__(self, cfg: DictConfig | None = None, out_dir: Path | None = None) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        self.names = list(selected(cfg)) if cfg is not None and out_dir is not None else []
        self.loggers: list[Logger] = []
        self.steps_per_epoch = 0
        self.done_epochs = 0  # epochs whose steps are numbered already
        self._pending: list[tuple[int, int, torch.Tensor, float]] = []
        self._flushed = time.monotonic()

    def open(self, *, done_epochs: int, steps_per_epoch: int, resumed: bool) -> None:
        """Open each logger; a run resumed after `done_epochs` epochs continues its steps."""
        if not self.names:
            return
        assert self.cfg is not None and self.out_dir is not None
        self.steps_per_epoch, self.done_epochs = steps_per_epoch, done_epochs
        params = flat_config(self.cfg)
        for name in self.names:
            start = Start(
                out_dir=Path(self.out_dir),
                cfg=self.cfg,
                settings=self.cfg.logger[name],
                start_step=done_epochs * steps_per_epoch,
                resumed=resumed,
                params=params,
            )
            try:
                self.loggers.append(_open(name, start))
            except Exception as exc:
                _warn(name, "starting", exc)
        self._flushed = time.monotonic()

    @property
    def step_hook(self) -> Callable[[int, torch.Tensor, float], None] | None:
        """What the training loop calls after each step; None when nothing is logged."""
        return self.on_step if self.names else None

    def on_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        # No host synchronisation here: the loss stays on the device until a flush.
        global_step = self.done_epochs * self.steps_per_epoch + step
        self._pending.append((global_step, self.done_epochs + 1, loss, lr))
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the collected steps to the loggers (one read of all their losses)."""
        self._flushed = time.monotonic()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            losses = torch.cat([p[2].reshape(1).float() for p in pending]).tolist()
        except Exception as exc:  # the device itself failed: these steps are lost, not the run
            log.warning("%d step losses not logged: %s", len(pending), _reason(exc))
            return
        rows = [
            {"step": step, "epoch": epoch, "train_loss": loss, "lr": lr}
            for (step, epoch, _, lr), loss in zip(pending, losses, strict=True)
        ]
        self._each("logging steps", lambda logger: logger.steps(rows))

    def epoch_end(self, row: Mapping[str, Any]) -> None:
        """After an epoch: its steps, then its metrics.csv row's values."""
        self.flush()
        self.done_epochs = int(row["epoch"])
        step = self.done_epochs * self.steps_per_epoch
        metrics = _numbers(row, EPOCH_METRICS)
        self._each("logging an epoch", lambda logger: logger.epoch(metrics, step))

    def finish(self, results: Mapping[str, Any]) -> None:
        """The run completed: final values, hyperparameters, figures, files; then close."""
        self.flush()
        step = self.done_epochs * self.steps_per_epoch
        metrics = _numbers(results, FINAL_METRICS)
        self._each("logging the results", lambda logger: logger.finish(metrics, step))
        self.close("FINISHED")

    def close(self, status: str) -> None:
        """Close every logger with the run's status (FINISHED, FAILED or KILLED)."""
        self.flush()  # the steps before a failure happened: record them too
        self._each("closing", lambda logger: logger.close(status))
        self.loggers = []

    def _each(self, what: str, call: Callable[[Logger], None]) -> None:
        for logger in list(self.loggers):
            try:
                call(logger)
            except Exception as exc:
                self.loggers.remove(logger)
                _warn(logger.name, what, exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _warn(name: str, what: str, exc: BaseException) -> None:
    log.warning(
        "logger %s failed while %s (%s); training goes on without it, the run folder's CSV "
        "files keep the record",
        name,
        what,
        _reason(exc),
    )
