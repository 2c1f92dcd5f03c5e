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
  swept keys, and the validation-loss curves of every run overlaid.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_run.outputs import atomic
from cifar_run.outputs import files as report

if TYPE_CHECKING:  # pandas and matplotlib load lazily: `cifar-run` must start fast
    import pandas as pd

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SWEEP_FILE = "multirun.yaml"  # Hydra writes it into every sweep folder
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
MISSING = "missing"  # status of a job folder without results.json (killed before it started)
MAX_LEGEND = 12  # more curves than this get no legend: it would cover the plot


@dataclass
class Run:
    """What one run folder says about itself."""

    path: Path
    overrides: dict[str, Any]
    results: dict[str, Any]
    rows: list[dict[str, Any]]  # the run's table rows when it has several (dense + pruned)
    table_columns: list[str]  # the columns of its results.csv (RESULT_COLUMNS without one)
    sweep: Path | None = None  # the sweep folder holding it, if any
    _config: Any = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return str(self.results.get("status", MISSING))

    @property
    def error(self) -> str:
        if not self.results:
            return f"no readable {RESULTS_FILE} (the job did not start, or was killed)"
        return str(self.results.get("error") or "")

    def value(self, key: str) -> Any:
        """The run's value of a config key: its override, else its saved config."""
        if key in self.overrides:
            return self.overrides[key]
        if self._config is None:
            from omegaconf import OmegaConf

            for name in ("config.yaml", ".hydra/config.yaml"):
                if (self.path / name).is_file():
                    self._config = OmegaConf.load(self.path / name)
                    break
            else:
                self._config = {}
        if not self._config:
            return None
        from omegaconf import DictConfig, OmegaConf

        try:
            value = OmegaConf.select(self._config, key, throw_on_resolution_failure=False)
        except Exception:  # an interpolation that cannot resolve outside its run
            return None
        if isinstance(value, DictConfig):  # a config group: its option's name
            return value.get("name")
        return value


class NoRunsError(ValueError):
    """A path holds no run folder."""


def _natural_key(path: Path) -> list[Any]:
    # Job folders are numbered 0_, 1_, ..., 10_: sort 2 before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(path: Path) -> list[Path]:
    """Run folders at or under `path`: every folder with a results.json, and in a sweep folder
    every job folder Hydra created (one without results.json is listed as `missing`)."""
    path = Path(path)
    found = {p.parent for p in path.rglob(RESULTS_FILE)}
    sweeps = {p.parent for p in path.rglob(SWEEP_FILE)}
    for sweep in sweeps:
        found.update(p.parents[1] for p in sweep.glob(f"*/{OVERRIDES_FILE.as_posix()}"))
    return sorted(found, key=_natural_key)


def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """`key=value` strings (as in .hydra/overrides.yaml) -> {key: typed value}; hydra.* left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for line in lines:
        try:
            override = parser.parse_overrides([line])[0]
        except Exception:  # not Hydra syntax after all: keep the text
            key, _, value = line.partition("=")
            out[key.lstrip("+~")] = value
            continue
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra"):
            continue
        if override.is_sweep_override():
            out[key] = line.partition("=")[2]
            continue
        value = override.value()
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


def _sweep_keys(sweep: Path) -> list[str]:
    """Keys the sweep's command line gave several values (from its multirun.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.load(sweep / SWEEP_FILE).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(task))
    except Exception as exc:  # an unreadable multirun.yaml costs the column order only
        log.warning("%s: cannot read the swept keys (%s)", sweep / SWEEP_FILE, exc)
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(path: Path) -> Run:
    import pandas as pd
    import yaml

    path = Path(path)
    results = _read_json(path / RESULTS_FILE)
    overrides: dict[str, Any] = {}
    if (path / OVERRIDES_FILE).is_file():
        lines = yaml.safe_load((path / OVERRIDES_FILE).read_text()) or []
        overrides = parse_overrides([str(line) for line in lines])
    rows: list[dict[str, Any]] = []
    if isinstance(results.get("rows"), list):  # rows stored in results.json win: typed
        rows = [dict(r) for r in results["rows"] if isinstance(r, dict)]
    columns = report.table_columns(rows) if rows else list(report.RESULT_COLUMNS)
    if (path / "results.csv").is_file():
        try:
            table = pd.read_csv(path / "results.csv")
        except (OSError, ValueError):  # unreadable: results.json still has the numbers
            table = None
        if table is not None:
            columns = list(table.columns)
            if not rows and len(table) > 1:
                rows = table.to_dict("records")
    sweep = path.parent if (path.parent / SWEEP_FILE).is_file() else None
    return Run(path, overrides, results, rows, columns, sweep)


def load_runs(paths: list[Path]) -> list[Run]:
    """Every run under each path, each once; NoRunsError names a path that holds none."""
    seen: dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise NoRunsError(f"{path}: no such folder")
        runs = find_runs(path)
        if not runs:
            raise NoRunsError(
                f"{path}: no run folders here; expected a run folder (with {RESULTS_FILE}) "
                f"or a sweep folder (with {SWEEP_FILE} and job folders)"
            )
        seen.update(dict.fromkeys(p.resolve() for p in runs))
    return [load_run(p) for p in seen]


def swept_keys(runs: list[Run]) -> list[str]:
    """The sweeps' swept keys in command-line order, then any other key whose value differs."""
    keys: list[str] = []
    for sweep in dict.fromkeys(r.sweep for r in runs if r.sweep is not None):
        keys += [k for k in _sweep_keys(sweep) if k not in keys]
    every = list(dict.fromkeys(k for r in runs for k in r.overrides))
    for key in every:
        if key not in keys and len({repr(r.value(key)) for r in runs}) > 1:
            keys.append(key)
    return keys


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

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.status != "completed"]

    def markdown(self) -> str:
        return frame_markdown(self.table, self.md_columns)

    def seeds_markdown(self) -> str | None:
        return None if self.seeds is None else frame_markdown(self.seeds, list(self.seeds.columns))

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
    return Summary(table, keys, md_columns, labels, seed_table(table, keys, labels), runs)


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

    names = dict(zip([r.path for r in summary.runs], _run_names(summary.runs), strict=True))
    curves, epochs = 0, set()
    for run in summary.runs:
        try:
            metrics = pd.read_csv(run.path / "metrics.csv")
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if metrics.empty or "val_loss" not in metrics:
            continue
        label = _label({k: run.value(k) for k in summary.keys}) if summary.keys else names[run.path]
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


def write_summary(summary: Summary, out_dir: Path) -> list[Path]:
    """summary.csv, summary.md, summary.png (and summary_seeds.*) in out_dir; returns the paths."""
    out_dir = Path(out_dir)
    written = [out_dir / "summary.csv", out_dir / "summary.md"]
    atomic.write_text(written[0], summary.table.to_csv(index=False))
    selection = "".join(f"\n{line}\n" for line in summary.selection())
    atomic.write_text(written[1], summary.markdown() + selection)
    if summary.seeds is not None:
        written += [out_dir / "summary_seeds.csv", out_dir / "summary_seeds.md"]
        atomic.write_text(written[2], summary.seeds.to_csv(index=False))
        atomic.write_text(written[3], summary.seeds_markdown() or "")
    written.append(out_dir / "summary.png")
    plot_summary(summary, written[-1])
    return written
