"""steps.csv (the `csv` logger): step, epoch, train_loss, lr of every training step.

Appended as the tracker hands over rows (a few times a second). A resumed run keeps the rows
up to its checkpoint and writes the redone steps anew; a fresh run starts the file over.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cifar_run.outputs import atomic
from cifar_run.outputs.loggers.base import Start

STEPS_FILE = "steps.csv"
COLUMNS = ("step", "epoch", "train_loss", "lr")


def rows_up_to(path: Path, last_step: int) -> list[list[str]]:
    """The rows of an existing steps.csv up to `last_step`, as written (a torn last line of a
    killed run is left out)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    kept = []
    for row in list(csv.reader(io.StringIO(text)))[1:]:
        if len(row) == len(COLUMNS) and row[0].isdigit() and int(row[0]) <= last_step:
            kept.append(row)
    return kept


class StepsCsv:
    name = "csv"

    def __init__(self, start: Start) -> None:
        self.path = start.out_dir / STEPS_FILE
        self.every = int(start.settings.get("every_n_steps", 1))
        kept = rows_up_to(self.path, start.start_step) if start.resumed else []
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(kept)
        atomic.write_text(self.path, buf.getvalue())
        self.file = open(self.path, "a", newline="")  # appended to until close()
        self.writer = csv.writer(self.file, lineterminator="\n")

    def steps(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["step"] % self.every == 0:
                self.writer.writerow([row[c] for c in COLUMNS])
        self.file.flush()

    def epoch(self, metrics: dict[str, float], step: int) -> None:
        """metrics.csv has the epochs."""

    def finish(self, metrics: dict[str, float], step: int) -> None:
        """results.json has the results."""

    def close(self, status: str) -> None:
        self.file.close()
