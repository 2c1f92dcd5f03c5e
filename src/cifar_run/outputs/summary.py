"""Sweep summaries: one table and one figure across run folders.

Written by the multirun callback into the sweep folder and by `cifar-report` from any run or
sweep folders:

- summary.csv: one row per run (per table row of a run: a pruned run has a dense and a pruned
  row), the swept keys first, then every result column, `status` and `error`;
- summary.md: the swept keys, the results-table columns, `status` (and `error`), `run`;
- summary_seeds.csv/.md, when `seed` is swept: mean and standard deviation of every accuracy
  over the seeds, grouped by the other swept keys;
- the selection: per kind of row (dense, pruned), the setting with the highest validation
  accuracy (with `seed` swept, the highest mean over seeds) and the test accuracy that goes
  with it, the honest figure for a sweep (choosing by test accuracy would overstate it);
  after the table in summary.md and on the terminal;
- summary.png: test accuracy against each swept numeric key, one line per value of the other
  swept keys, and the validation-loss curves of every run overlaid (outputs.summary_plot);
- reference.md/.csv, for runs of an experiment that quotes its report's figures: ours beside
  the report's, in the report's table shape (outputs.reference).

The runs come from outputs.run_folders (load_runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_run.outputs import atomic
from cifar_run.outputs import files as report
from cifar_run.outputs.reference import Comparison, compare, reference_markdown, write_reference
from cifar_run.outputs.run_folders import Run, swept_keys
from cifar_run.outputs.summary_plot import plot_summary

if TYPE_CHECKING:  # pandas loads lazily: `cifar-run` must start fast
    import pandas as pd

log = logging.getLogger(__name__)


def _scalars(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _run_names(runs: list[Run]) -> list[str]:
    """Folder names, or paths from the runs' common parent where names repeat (two sweeps)."""
    names = [r.path.name for r in runs]
    if len(set(names)) == len(names):
        return names
    root = Path(os.path.commonpath([r.path.parent for r in runs]))
    return [r.path.relative_to(root).as_posix() for r in runs]


@dataclass
class Summary:
    table: pd.DataFrame  # every column
    keys: list[str]  # swept keys (the first columns)
    md_columns: list[str]
    label_columns: list[str]  # columns telling apart the rows of one run (e.g. `pruned`)
    seeds: pd.DataFrame | None
    runs: list[Run]
    comparisons: list[Comparison] = field(default_factory=list)  # beside reports' figures

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.status != "completed"]

    def markdown(self) -> str:
        return frame_markdown(self.table, self.md_columns)

    def seeds_markdown(self) -> str | None:
        return None if self.seeds is None else frame_markdown(self.seeds, list(self.seeds.columns))

    def reference_markdown(self) -> str | None:
        """The tables of our runs beside their reports' figures (None: no such runs)."""
        return reference_markdown(self.comparisons) if self.comparisons else None

    def selection(self) -> list[str]:
        """One line per kind of row (the label columns' values): the setting chosen on
        validation accuracy and its test accuracy; none for fewer than two settings."""
        table = self.table
        done = table[(table["status"] == "completed") & table["best_val_acc"].notna()]
        settings = [k for k in self.keys if k != "seed"]
        over_seeds = "seed" in self.keys
        if done.empty or (over_seeds and not settings):
            return []
        lines = []
        grouped = (
            done.groupby(self.label_columns, sort=False) if self.label_columns else [((), done)]
        )
        for values, group in grouped:
            values = values if isinstance(values, tuple) else (values,)
            kind = ", ".join(f"{k}={v}" for k, v in zip(self.label_columns, values, strict=True))
            kind = f" ({kind})" if kind else ""
            if over_seeds:
                stats = group.groupby(settings, sort=False, dropna=False)[
                    ["best_val_acc", "test_acc"]
                ].agg(["mean", "std", "size"])
                if len(stats) < 2:
                    continue
                # By position: an index holding NaN (a key some runs lack) defeats .loc.
                pos = int(stats[("best_val_acc", "mean")].to_numpy().argmax())
                row = stats.iloc[pos]
                best = stats.index[pos]
                best = best if isinstance(best, tuple) else (best,)
                setting = _setting(zip(settings, best, strict=True))
                n = int(row[("test_acc", "size")])
                lines.append(
                    f"selected on validation{kind}: {setting}, mean of {n} seeds: "
                    f"val {row[('best_val_acc', 'mean')]:.2f}% "
                    f"(sd {_sd(row[('best_val_acc', 'std')])}), "
                    f"test {row[('test_acc', 'mean')]:.2f}% (sd {_sd(row[('test_acc', 'std')])})"
                    + _ties(stats[("best_val_acc", "mean")])
                )
                continue
            if len(group) < 2:
                continue
            row = group.iloc[int(group["best_val_acc"].to_numpy().argmax())]
            setting = _setting((k, row[k]) for k in settings) or str(row["run"])
            lines.append(
                f"selected on validation{kind}: {setting} (run {row['run']}): "
                f"val {row['best_val_acc']:.2f}%, test {row['test_acc']:.2f}%"
                + _ties(group["best_val_acc"])
            )
        return lines


def _ties(val_accs: pd.Series) -> str:
    """Say so when the first of the best is not the only one: validation does not decide."""
    others = int((val_accs == val_accs.max()).sum()) - 1
    return f"; tied on validation with {others} other(s), the first is named" if others else ""


def _setting(pairs: Iterable[tuple[str, Any]]) -> str:
    """`key=value, ...` of the swept keys a run has (runs of several sweeps may lack some)."""
    return ", ".join(f"{k}={v}" for k, v in pairs if not (isinstance(v, float) and v != v))


def _sd(value: float) -> str:
    """A standard deviation for the selection line; one seed has none."""
    return "-" if value != value else f"{value:.2f}"


def _label_columns(runs: list[Run]) -> list[str]:
    """Text or boolean columns whose value differs between the rows of one run."""
    labels: list[str] = []
    for run in runs:
        for col in dict.fromkeys(c for row in run.rows for c in row):
            values = {repr(row.get(col)) for row in run.rows}
            sample = next((row.get(col) for row in run.rows if row.get(col) is not None), None)
            if len(values) > 1 and isinstance(sample, (str, bool)) and col not in labels:
                labels.append(col)
    return labels


def summarize(runs: list[Run]) -> Summary:
    """The summary table (and the over-seeds table) of these runs."""
    import pandas as pd

    keys = swept_keys(runs)
    records = []
    for run, name in zip(runs, _run_names(runs), strict=True):
        base = {k: run.value(k) for k in keys}
        scalars = _scalars(run.results)
        scalars.pop("rows", None)
        for i, row in enumerate(run.rows or [{}]):
            record = dict(base)
            merged = {**scalars, **_scalars(row)}
            record.update({k: v for k, v in merged.items() if k not in keys})
            record.update(status=run.status, error=run.error, run=name, row=i, path=str(run.path))
            records.append(record)
    table = pd.DataFrame.from_records(records)
    result_columns = list(dict.fromkeys(c for r in runs for c in r.table_columns if c not in keys))
    for col in result_columns:
        if col not in table:
            table[col] = None
    has_error = table["error"].astype(str).str.len().gt(0).any()
    md_columns = [*keys, *result_columns, "status", *(["error"] if has_error else []), "run"]
    front = [*keys, *result_columns, "status", "error"]
    rest = [c for c in table.columns if c not in front and c not in ("run", "row", "path")]
    labels = _label_columns(runs)
    multi_row = any(len(r.rows) > 1 for r in runs)
    table = table[[*front, *rest, "run", *(["row"] if multi_row else []), "path"]]
    seeds = seed_table(table, keys, labels)
    return Summary(table, keys, md_columns, labels, seeds, runs, _comparisons(runs))


def _comparisons(runs: list[Run]) -> list[Comparison]:
    try:
        return compare(runs)
    except Exception:  # the summary must not fail for the sake of the reference table
        log.exception("no reference table (ours beside the report's figures)")
        return []


def _accuracy_columns(table: pd.DataFrame) -> list[str]:
    import pandas as pd

    return [
        c
        for c in table.columns
        if c.endswith("_acc")
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]


def seed_table(table: pd.DataFrame, keys: list[str], labels: list[str]) -> pd.DataFrame | None:
    """Mean and (sample) standard deviation of each accuracy over `seed`, per other swept key."""
    if "seed" not in keys:
        return None
    done = table[table["status"] == "completed"]
    accs = _accuracy_columns(done)
    if done.empty or not accs:
        return None
    groups = [k for k in keys if k != "seed"] + labels
    if "row" in done and not labels:
        groups.append("row")  # several rows per run and nothing naming them: their position
    grouped = (
        done.groupby(groups, dropna=False, sort=False)
        if groups
        else done.groupby(lambda _: 0, sort=False)
    )
    stats = grouped[accs].agg(["mean", "std"])
    stats.columns = [f"{col}_{stat}" for col, stat in stats.columns]
    stats.insert(0, "seeds", grouped.size())
    return stats.reset_index(drop=not groups)


def frame_markdown(table: pd.DataFrame, columns: list[str]) -> str:
    """A Markdown table of `columns`: two decimals for accuracies, exact hyperparameters."""
    import pandas as pd

    records = []
    for _, row in table[columns].iterrows():
        record = {}
        for col in columns:
            value = row[col]
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                value = None
            elif isinstance(value, float) and ("_acc" in col or col.endswith(("loss", "seconds"))):
                value = f"{value:.2f}"
            elif isinstance(value, float) and value.is_integer():
                value = int(value)  # a count in a column pandas widened to float for a gap
            elif isinstance(value, str):
                value = value.replace("|", "\\|").replace("\n", " ")
            record[col] = value
        records.append(record)
    return report.markdown_table(records, columns)


def write_summary(summary: Summary, out_dir: Path) -> list[Path]:
    """summary.csv, summary.md, summary.png (and summary_seeds.*, reference.*) in out_dir;
    returns the paths."""
    out_dir = Path(out_dir)
    written = [out_dir / "summary.csv", out_dir / "summary.md"]
    atomic.write_text(written[0], summary.table.to_csv(index=False))
    selection = "".join(f"\n{line}\n" for line in summary.selection())
    atomic.write_text(written[1], summary.markdown() + selection)
    if summary.seeds is not None:
        written += [out_dir / "summary_seeds.csv", out_dir / "summary_seeds.md"]
        atomic.write_text(written[2], summary.seeds.to_csv(index=False))
        atomic.write_text(written[3], summary.seeds_markdown() or "")
    written += write_reference(summary.comparisons, out_dir)
    written.append(out_dir / "summary.png")
    plot_summary(summary, written[-1])
    return written
