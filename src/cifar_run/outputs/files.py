"""Run-folder outputs: metrics.csv, results.{json,csv,md}, loss.png and accuracy.png,
confusion.{csv,png} (and with pruning: sparsity.csv, curve.csv, finetune.csv, sparsity.png).

Every file is written atomically, so a killed run never leaves half a table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cifar_run.exits import os_error_line
from cifar_run.outputs import atomic

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
# The one-row results table of a run (accuracies in percent). Later stages add columns.
RESULT_COLUMNS = (
    "model",
    "params",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "seed",
    "device",
    "best_val_acc",
    "best_epoch",
    "test_acc",
    "train_seconds",
)
# confusion.png: numbers in the cells up to this many classes; at most this many inches a side.
CONFUSION_NUMBERS = 20
CONFUSION_MAX_INCHES = 12.0


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _cell(value: Any, column: str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        # Accuracies and durations read best rounded; hyperparameters must stay exact.
        if column.endswith(("_acc", "seconds", "loss")):
            return f"{value:.2f}"
        return f"{value:g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table; floats with two decimals."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A CSV file with these columns (missing values empty), written atomically."""
    atomic.write_text(path, _csv_text(rows, columns))


def write_metrics(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """metrics.csv: one row per epoch (rewritten whole after each epoch)."""
    atomic.write_text(out_dir / "metrics.csv", _csv_text(rows, METRIC_COLUMNS))


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """RESULT_COLUMNS first, then any extra columns the rows carry, in first-seen order."""
    columns = list(RESULT_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _strict(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has no such numbers, and strict readers
    (jq, JavaScript, most other languages) refuse the `NaN` Python would write."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def write_status(out_dir: Path, results: Mapping[str, Any]) -> None:
    """results.json alone: while a run is `running`, or once it has `failed`."""
    text = json.dumps(_strict(results), indent=2, default=str, allow_nan=False)
    atomic.write_text(out_dir / "results.json", text + "\n")


def mark_failed(out_dir: Path, results: Mapping[str, Any], exc: BaseException) -> None:
    """results.json says `failed`, with the first line of `exc`; unless it says `completed`
    already (an interrupt after the results were written). Where this write fails too (a full
    disk), the file keeps the status it had: `running` claims nothing either."""
    try:
        status = json.loads((out_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "completed":
        return
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        write_status(out_dir, {**results, "status": "failed", "error": message})
    except OSError as write_error:
        log.warning("could not mark the run failed: %s", os_error_line(write_error))


def write_results(
    out_dir: Path,
    results: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """results.csv / results.md (the table rows), then results.json (everything).

    `notes` (warnings, e.g. fully pruned layers) are listed under the table in results.md.
    results.json comes last: its status is what says a run completed, so a write that fails
    before it (a full disk) leaves the status it had.
    """
    if rows is None:
        rows = [{c: results.get(c) for c in RESULT_COLUMNS}]
    columns = table_columns(rows)
    atomic.write_text(out_dir / "results.csv", _csv_text(rows, columns))
    text = markdown_table(rows, columns)
    if notes:
        text += "\n" + "".join(f"- {note}\n" for note in notes)
    atomic.write_text(out_dir / "results.md", text)
    write_status(out_dir, results)


def plot_curves(out_dir: Path, rows: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """loss.png and accuracy.png: train and validation curves per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    for metric, ylabel, name in (
        ("loss", "cross-entropy loss", "loss"),
        ("acc", "accuracy (%)", "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], marker="o", label="train")
        val = [r[f"val_{metric}"] for r in rows]
        if any(_finite(v) for v in val):  # data.val_size=0 validates nothing: no such line
            ax.plot(epochs, val, marker="o", label="validation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {name}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        atomic.save_figure(fig, out_dir / f"{name}.png")
        plt.close(fig)


def plot_sparsity(out_dir: Path, rows: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """sparsity.png: validation and test accuracy against global sparsity (pruning.curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["sparsity"])
    x = [100.0 * r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["val_acc"] for r in rows], marker="o", label="validation")
    ax.plot(x, [r["test_acc"] for r in rows], marker="s", label="test")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title} accuracy vs sparsity (no fine-tuning)".strip())
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    atomic.save_figure(fig, out_dir / "sparsity.png")
    plt.close(fig)


def class_accuracy(classes: Sequence[str], confusion: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Percent of each class's images predicted as that class (None: no images of it)."""
    acc: dict[str, Any] = {}
    for i, name in enumerate(classes):
        total = sum(confusion[i])
        acc[name] = 100.0 * confusion[i][i] / total if total else None
    return acc


def write_confusion(
    out_dir: Path, classes: Sequence[str], confusion: Sequence[Sequence[int]]
) -> None:
    """confusion.csv: one row per true class, its image count under each predicted class,
    then `images` and `acc` (percent correct)."""
    acc = class_accuracy(classes, confusion)
    rows = [
        {
            "true": name,
            **dict(zip(classes, confusion[i], strict=True)),
            "images": sum(confusion[i]),
            "acc": acc[name],
        }
        for i, name in enumerate(classes)
    ]
    write_csv(out_dir / "confusion.csv", rows, ["true", *classes, "images", "acc"])


def plot_confusion(
    out_dir: Path, classes: Sequence[str], confusion: Sequence[Sequence[int]], title: str = ""
) -> None:
    """confusion.png: the test confusion matrix, each row in percent of its true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    share = [[100.0 * c / max(1, sum(row)) for c in row] for row in confusion]
    # Cells grow with the class count up to a size that stays on a screen; past
    # CONFUSION_NUMBERS classes the colours alone tell the shares (the numbers are in the CSV).
    side = min(CONFUSION_MAX_INCHES, 0.6 * k)
    fig, ax = plt.subplots(figsize=(1.0 + side, 0.6 + side))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for i in range(k if k <= CONFUSION_NUMBERS else 0):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{share[i][j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i][j] > 50 else "black",
            )
    small = {} if k <= CONFUSION_NUMBERS else {"fontsize": 5}
    ax.set_xticks(
        range(k), classes, rotation=45 if k <= CONFUSION_NUMBERS else 90, ha="right", **small
    )
    ax.set_yticks(range(k), classes, **small)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} test confusion (% of each true class)".strip())
    fig.tight_layout()
    atomic.save_figure(fig, out_dir / "confusion.png")
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
