"""summary.png: test accuracy against each swept numeric key, and every run's validation loss.

One panel per swept numeric key, up to MAX_PANELS (one line per value of the other swept
keys; with `seed` swept, the mean over seeds with the standard deviation as error bar), or a
bar per run when no swept key is numeric, and the validation-loss curves of every run
overlaid: one panel under the other, each legend outside to its right, labels kept short,
so the figure keeps one width and a bounded height however many runs and keys it shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cifar_run.outputs import atomic

if TYPE_CHECKING:  # pandas and matplotlib load lazily: `cifar-run` must start fast
    import pandas as pd

    from cifar_run.outputs.run_folders import Run

MAX_LEGEND = 12  # more curves than this get no legend: it would outgrow the figure
MAX_PANELS = 3  # accuracy panels drawn; further swept numeric keys are named under the figure
MAX_BARS = 25  # runs in the bar panel (the best by test accuracy); summary.csv has them all
LABEL_CHARS = 40  # a legend or bar label is cut to this length (summary.csv has it whole)
PANEL = (6.5, 2.8)  # inches of one panel; its legend goes to its right, outside
LEGEND_INCHES = 3.5  # room to the right of the panels for the legends


class Summary(Protocol):
    """What the figure reads of a sweep summary (outputs.summary.Summary)."""

    table: pd.DataFrame  # one row per table row of a run, with its `run` name and `path`
    keys: list[str]  # the swept keys
    label_columns: list[str]  # columns telling apart the rows of one run
    runs: list[Run]


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _label(values: dict[str, Any]) -> str:
    """`key=value, ...`, short: dotted keys by their last part, cut at LABEL_CHARS."""
    text = ", ".join(f"{k.rpartition('.')[2]}={_value(v)}" for k, v in values.items())
    text = text or "all runs"
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "\u2026"


def _legend(ax: Any) -> None:
    """The panel's legend outside it, to its right, where it covers no curve."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _is_numeric_key(table: pd.DataFrame, key: str) -> bool:
    import pandas as pd

    col = table[key]
    return (
        pd.api.types.is_numeric_dtype(col)
        and not pd.api.types.is_bool_dtype(col)
        and col.nunique() > 1
    )


def _accuracy_panel(ax: Any, summary: Summary, x: str) -> None:
    done = _completed(summary)
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
        _legend(ax)


def _completed(summary: Summary) -> pd.DataFrame:
    table = summary.table
    return table[(table["status"] == "completed") & table["test_acc"].notna()]


def _bar_panel(ax: Any, summary: Summary) -> None:
    """A bar per run (the best MAX_BARS by test accuracy, in table order)."""
    done = _completed(summary)
    shown = done.loc[done["test_acc"].nlargest(MAX_BARS).index.sort_values()]
    cols = summary.keys + summary.label_columns or ["run"]
    labels = [_label({c: r[c] for c in cols}) for _, r in shown.iterrows()]
    ax.barh(range(len(shown)), shown["test_acc"])
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    more = f" (the best {len(shown)} of {len(done)} runs)" if len(shown) < len(done) else ""
    ax.set_title(f"test accuracy{more}")
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
        _legend(ax)


def plot_summary(summary: Summary, path: Path) -> None:
    """summary.png: accuracy against each swept numeric key (at most MAX_PANELS), and the
    validation-loss curves; one panel under the other, legends outside to their right, so the
    figure stays the same width and on a screen however many runs and keys the sweep has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in summary.keys if _is_numeric_key(summary.table, k)]
    if "seed" in numeric and len(summary.keys) > 1:
        numeric.remove("seed")  # seeds become error bars on the other keys' panels
    shown, hidden = numeric[:MAX_PANELS], numeric[MAX_PANELS:]
    width, height = PANEL
    heights = [height] * len(shown)
    if not numeric:  # a bar per run: room for each of them, up to MAX_BARS
        heights.append(max(height, 0.2 * min(MAX_BARS, len(_completed(summary)))))
    heights.append(height)
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(width + LEGEND_INCHES, sum(heights) + 0.3),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    for ax, key in zip(axes[:, 0], shown, strict=False):
        _accuracy_panel(ax, summary, key)
    if not numeric:
        _bar_panel(axes[0][0], summary)
    _curves_panel(axes[-1][0], summary)
    if hidden:
        fig.suptitle(
            f"also swept: {', '.join(hidden)} (no panel of their own; see summary.csv)",
            fontsize="small",
        )
    atomic.save_figure(fig, path)
    plt.close(fig)
