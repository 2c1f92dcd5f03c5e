"""TensorBoard event files in the run folder (the `tensorboard` logger).

Per step: train/loss_step and train/lr; per epoch: train/loss, train/acc, val/loss, val/acc,
epoch; at the end: the final/ values, the resolved config as hyperparameters with those values
as their metrics (TensorBoard's HParams view compares the runs of a sweep on them), and the
run's figures as images. `tensorboard --logdir <sweep or runs folder>` shows every run folder
as a run of its own.
"""

from __future__ import annotations

from typing import Any

from cifar_run.outputs.loggers.base import STEP_LOSS, STEP_LR, Start

FIGURES = ("loss", "accuracy", "confusion", "sparsity")  # the run folder's <name>.png
FLUSH_SECONDS = 30  # the writer's own flush; every epoch flushes too


def hparam_values(params: dict[str, Any]) -> dict[str, Any]:
    """Config values as the HParams plugin takes them: numbers, text and booleans (lists and
    other values as text; nulls left out, as it has no null)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, start: Start) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = start.out_dir
        self.every = int(start.settings.get("every_n_steps", 1))
        self.params = start.params
        # purge_step: TensorBoard hides what earlier event files in this folder hold from
        # that step on: a resumed run's steps past its checkpoint (redone now), or all of
        # an earlier attempt that never reached a checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(start.out_dir), purge_step=start.start_step + 1, flush_secs=FLUSH_SECONDS
        )

    def steps(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["step"] % self.every == 0:
                self.writer.add_scalar(STEP_LOSS, row["train_loss"], row["step"])
                self.writer.add_scalar(STEP_LR, row["lr"], row["step"])

    def epoch(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, metrics: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        # Into this run's own event file (SummaryWriter.add_hparams would start another run
        # in a subfolder): the HParams view pairs them with the final/ scalars above.
        writer = self.writer._get_file_writer()
        for summary in hparams(hparam_values(self.params), dict(metrics)):
            writer.add_summary(summary, step)
        self._figures(step)
        self.writer.flush()

    def _figures(self, step: int) -> None:
        import numpy as np
        from PIL import Image

        for name in FIGURES:
            path = self.out_dir / f"{name}.png"
            if path.is_file():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"figures/{name}", pixels, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()
