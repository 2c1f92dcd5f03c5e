"""summary.png: test accuracy against each swept numeric key, and every run's validation loss.

One panel per swept numeric key (one line per value of the other swept keys; with `seed`
swept, the mean over seeds with the standard deviation as error bar), or a bar per run when
no swept key is numeric, and the validation-loss curves of every run overlaid.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cifar_run.outputs import atomic

if TYPE_CHECKING:  # pandas and matplotlib load lazily: `cifar-run` must start fast
    import pandas as pd

    from cifar_run.outputs.run_folders import Run

MAX_LEGEND = 12  # more curves than this get no legend: it would cover the plot


class Summary(Protocol):
    """What the figure reads of a sweep summary (outputs.summary.Summary)."""

    table: pd.DataFrame  # one row per table row of a run, with its `run` name and `path`
    keys: list[str]  # the swept keys
    label_columns: list[str]  # columns telling apart the rows of one run
    runs: list[Run]


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def _is_numeric_key(table: pd.DataFrame, key: str) -> bool:
    import pandas as pd

    col = table[key]
    return (
        pd.api.types.is_numeric_dtype(col)
        and not pd.api.types.is_bool_dtype(col)
        and col.nunique() > 1
    )


def _accuracy_panel(ax: Any, summary: Summary, x: str) -> None:
    table = summary.table
    done = table[(table["status"] == "completed") & table["test_acc"].notna()]
    # With seed swept, the seeds of one setting make one point: their mean, std as error bar.
    seeds = "seed" in summary.keys and x != "seed"
    others = [k for k in summary.keys if k != x and not (seeds and k == "seed")]
    others += summary.label_columns
    groups = done.groupby(others, dropna=False, sort=False) if others else [((), done)]
    lines = 0
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        stats = group.groupby(x)["test_acc"].agg(["mean", "std"]).sort_index()
        label = _label(dict(zip(others, values, strict=True)))
        if seeds:
            yerr = stats["std"].fillna(0)
            ax.errorbar(stats.index, stats["mean"], yerr=yerr, marker="o", capsize=3, label=label)
        else:
            ax.plot(stats.index, stats["mean"], marker="o", label=label)
        lines += 1
    xs = sorted(done[x].dropna().unique())
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")  # lr and batch size sweeps are geometric
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel("test accuracy (%)" + (", mean and std over seeds" if seeds else ""))
    ax.set_title(f"test accuracy vs {x}")
    ax.grid(alpha=0.3)
    if not lines:
        ax.text(0.5, 0.5, "no completed runs", ha="center", transform=ax.transAxes)
    elif 1 < lines <= MAX_LEGEND:
        ax.legend(fontsize="small")


def _bar_panel(ax: Any, summary: Summary) -> None:
    table = summary.table
    done = table[(table["status"] == "completed") & table["test_acc"].notna()]
    cols = summary.keys + summary.label_columns or ["run"]
    labels = [_label({c: r[c] for c in cols}) for _, r in done.iterrows()]
    ax.barh(range(len(done)), done["test_acc"])
    ax.set_yticks(range(len(done)))
    ax.set_yticklabels(labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("test accuracy")
    ax.grid(alpha=0.3, axis="x")
    if done.empty:
        ax.text(0.5, 0.5, "no completed runs", ha="center", transform=ax.transAxes)


def _curves_panel(ax: Any, summary: Summary) -> None:
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    names = dict(zip(summary.table["path"], summary.table["run"], strict=True))  # as tabled
    curves, epochs = 0, set()
    for run in summary.runs:
        try:
            metrics = pd.read_csv(run.path / "metrics.csv")
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if metrics.empty or "val_loss" not in metrics:
            continue
        label = (
            _label({k: run.value(k) for k in summary.keys})
            if summary.keys
            else names[str(run.path)]
        )
        if run.status != "completed":
            label += f" ({run.status})"
        ax.plot(metrics["epoch"], metrics["val_loss"], marker="o", label=label)
        curves += 1
        epochs.update(int(e) for e in metrics["epoch"])
    if len(epochs) <= 20:
        ax.set_xticks(sorted(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss per run")
    ax.grid(alpha=0.3)
    if not curves:
        ax.text(0.5, 0.5, "no metrics.csv", ha="center", transform=ax.transAxes)
    elif curves <= MAX_LEGEND:
        ax.legend(fontsize="small")


def plot_summary(summary: Summary, path: Path) -> None:
    """summary.png: accuracy against each swept numeric key, and the validation-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in summary.keys if _is_numeric_key(summary.table, k)]
    if "seed" in numeric and len(summary.keys) > 1:
        numeric.remove("seed")  # seeds become error bars on the other keys' panels
    panels = len(numeric) or 1
    fig, axes = plt.subplots(1, panels + 1, figsize=(5.5 * (panels + 1), 4.5), squeeze=False)
    for ax, key in zip(axes[0], numeric, strict=False):
        _accuracy_panel(ax, summary, key)
    if not numeric:
        _bar_panel(axes[0][0], summary)
    _curves_panel(axes[0][-1], summary)
    fig.tight_layout()
    atomic.save_figure(fig, path)
    plt.close(fig)
