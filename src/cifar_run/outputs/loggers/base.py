"""What every logger shares: how it is opened, what it is called with, the metric names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

# The per-epoch values every logger records, from a metrics.csv row.
EPOCH_METRICS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
    "epoch": "epoch",
}
# The final values, from results.json; TensorBoard's HParams view compares runs on these.
FINAL_METRICS = {
    "final/best_val_acc": "best_val_acc",
    "final/test_acc": "test_acc",
    "final/test_loss": "test_loss",
    "final/best_epoch": "best_epoch",
}
STEP_LOSS, STEP_LR = "train/loss_step", "train/lr"


@dataclass
class Start:
    """What a logger is opened with."""

    out_dir: Path
    cfg: DictConfig
    settings: DictConfig  # the logger's own node: cfg.logger.<name>
    start_step: int  # the last step already done (a resumed run's checkpoint), else 0
    resumed: bool
    params: dict[str, Any] = field(default_factory=dict)  # the flattened config


class Logger(Protocol):
    name: str

    def steps(self, rows: list[dict[str, Any]]) -> None:
        """Rows of step, epoch, train_loss, lr (every_n_steps is the logger's to apply)."""

    def epoch(self, metrics: dict[str, float], step: int) -> None:
        """One epoch's values (EPOCH_METRICS names), at the epoch's last step."""

    def finish(self, metrics: dict[str, float], step: int) -> None:
        """The run completed: its final values (FINAL_METRICS names) and files."""

    def close(self, status: str) -> None:
        """The end, completed or not: FINISHED, FAILED or KILLED."""
