"""Our runs beside a report's published figures: reference.md and reference.csv.

For the runs of an experiment whose config quotes its report's figures (the `reference`
block: config.reference), a table in the report's own shape. With `table.columns` in the
block (report 000: model and pruned), one row per value of the report's row keys (batch
size) and, for each value of the column keys and each figure (validation, test), three
columns: ours, the report's, the difference; otherwise one row per swept setting with the
same three columns per figure. Several runs of one setting (`seed` swept) give our mean ±
standard deviation, so that a difference can be read against the seed noise. Notes under
the table say where the comparison is not like for like: the report's own (from its block),
the JPEG copy of the data, settings that differ from the report's, runs that did not finish.

reference.csv holds one line per compared figure: `report`, the keys, `figure`, `runs`,
`ours_mean`, `ours_std`, `reported`, `diff`, `source`.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from cifar_run.config.reference import FIGURES, Reference, ReferenceRow, parse_reference
from cifar_run.config.values import is_number
from cifar_run.errors import UserError
from cifar_run.outputs import atomic
from cifar_run.outputs import files as report
from cifar_run.outputs.run_folders import Run, swept_keys

log = logging.getLogger(__name__)

LABELS = ("pruned",)  # what tells the rows of one run apart (a pruning run: dense, pruned)
FIGURE_NAMES = {"val_acc": "val", "test_acc": "test"}
CSV_TAIL = ("figure", "runs", "ours_mean", "ours_std", "reported", "diff", "source")
JPEG_FOLDER = "cifar10-jpeg"  # the JPEG copy of CIFAR-10 at hand (../shared/data/README.md)
JPEG_NOTE = (
    "{k} of {n} runs trained and tested on the JPEG copy of CIFAR-10 ({roots}), not the "
    "original arrays the report used: its compression (JPEG quality 75, 4:2:0 chroma) costs "
    "about one to two points for small nets and more for strong recipes (airbench94: 94.0% on "
    "the original, 90.6% on the copy, 3.4 points; ../shared/data/README.md)"
)
FOLDER_NOTE = (
    "{k} of {n} runs used the image folder {roots}, not the CIFAR-10 data the report used: "
    "their figures are not like for like with the report's"
)


def _norm(value: Any) -> tuple:
    """A value comparable across sources: 64 == 64.0, but True != 1 and '8' != 8."""
    if value is None or isinstance(value, bool):
        return ("", value)
    if isinstance(value, int | float):
        return ("number", round(float(value), 12))
    return ("text", str(value))


def _show(key: str, value: Any) -> str:
    if key in LABELS:
        return "pruned" if value else "dense"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


def _key_value(run: Run, row: dict[str, Any], key: str) -> Any:
    """A key of one row of a run: a label from the row, else the run's config value."""
    if key in LABELS:
        return bool(row.get(key, False))
    value = run.value(key)
    value = row.get(key, run.results.get(key)) if value is None else value
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _reference_of(run: Run) -> Reference | None:
    block = run.results.get("reference")
    if block is None:
        block = run.section("reference")
    try:
        return parse_reference(block)
    except UserError as exc:  # a folder of another version: its table is lost, not the summary
        log.warning("%s: reference block left out (%s)", run.path, exc)
        return None


@dataclass
class Cell:
    """One compared figure: our values over the runs of a setting, the report's figure."""

    ours: list[float]
    reported: float | None
    source: str | None

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.ours) if self.ours else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.ours) if len(self.ours) > 1 else None

    @property
    def diff(self) -> float | None:
        mean = self.mean
        return None if mean is None or self.reported is None else mean - self.reported

    def texts(self) -> list[str]:
        """Ours (mean ± sd), the report's, the difference, as table cells."""
        mean, std, diff = self.mean, self.std, self.diff
        ours = "-" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        reported = "-" if self.reported is None else f"{self.reported:.2f}"
        return [ours, reported, "-" if diff is None else f"{diff:+.2f}"]


@dataclass
class Comparison:
    """One report's figures beside our runs of its experiment."""

    reference: Reference
    row_keys: list[str]
    column_keys: list[str]
    rows: list[tuple]  # values of row_keys, in table order
    columns: list[tuple]  # values of column_keys, in table order
    cells: dict[tuple, Cell]  # (row, column, figure) -> cell
    notes: list[str]

    @property
    def figures(self) -> list[str]:
        return self.reference.figures

    def _label(self, column: tuple) -> str:
        """`lenet5 dense`: a model by its name, a label by its value, other keys as key=value."""
        return " ".join(
            _show(key, value) if key in ("model", *LABELS) else f"{key}={_show(key, value)}"
            for key, value in zip(self.column_keys, column, strict=True)
        )

    def _row_cells(self, row: tuple) -> list[str]:
        cells = [_show(k, v) for k, v in zip(self.row_keys, row, strict=True)]
        for column in self.columns:
            for figure in self.figures:
                cell = self.cells.get((row, column, figure))
                cells += cell.texts() if cell else ["-", "-", "-"]
        return cells

    def table(self) -> str:
        """The Markdown table in the report's shape."""
        header = list(self.row_keys)
        if self.column_keys:
            for column in self.columns:
                for figure in self.figures:
                    name = f"{self._label(column)} {FIGURE_NAMES[figure]}"
                    header += [f"{name} ours", "report", "diff"]
            lines = [self._row_cells(row) for row in self.rows]
        else:  # one row per setting: the count of runs and where each figure comes from
            for figure in self.figures:
                name = FIGURE_NAMES[figure]
                header += [f"{name} ours", f"{name} report", f"{name} diff"]
            header += ["runs", "source"]
            lines = []
            for row in self.rows:
                cells = [self.cells.get((row, (), f)) for f in self.figures]
                known = [c for c in cells if c is not None]
                sources = dict.fromkeys(c.source for c in known if c.source)
                runs = max((len(c.ours) for c in known), default=0)
                lines.append([*self._row_cells(row), str(runs), "; ".join(sources) or "-"])
        rows = [header, ["---"] * len(header), *lines]
        return "".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |\n" for r in rows)

    def markdown(self) -> str:
        ref = self.reference
        title = f"Report {ref.report}" + (f" ({ref.title})" if ref.title else "")
        where = f" ({ref.file})" if ref.file else ""
        notes = "".join(f"- {note}\n" for note in self.notes)
        return f"{title}: ours beside the report's figures{where}\n\n{self.table()}\n{notes}"

    def records(self) -> list[dict[str, Any]]:
        """reference.csv's lines: one per compared figure."""
        out = []
        for row in self.rows:
            for column in self.columns:
                for figure in self.figures:
                    cell = self.cells.get((row, column, figure))
                    if cell is None:
                        continue
                    out.append(
                        {
                            "report": self.reference.report,
                            **dict(zip(self.row_keys, row, strict=True)),
                            **dict(zip(self.column_keys, column, strict=True)),
                            "figure": figure,
                            "runs": len(cell.ours),
                            "ours_mean": cell.mean,
                            "ours_std": cell.std,
                            "reported": cell.reported,
                            "diff": cell.diff,
                            "source": cell.source,
                        }
                    )
        return out


def _matches(ref_row: ReferenceRow, run: Run, row: dict[str, Any]) -> bool:
    return all(_norm(_key_value(run, row, k)) == _norm(v) for k, v in ref_row.match.items())


def _ranker(keys: list[str], reference: Reference, seen: list[tuple]):
    """Sort key of a tuple of `keys` values: the report's order first, then as seen."""
    order: dict[str, dict[tuple, int]] = {k: {} for k in keys}
    for ref_row in reference.rows:
        for key in keys:
            if key in ref_row.match:
                order[key].setdefault(_norm(ref_row.match[key]), len(order[key]))
    for values in seen:
        for key, value in zip(keys, values, strict=True):
            order[key].setdefault(_norm(value), len(order[key]))
    return lambda values: tuple(
        order[k].get(_norm(v), len(order[k])) for k, v in zip(keys, values, strict=True)
    )


def _layout(reference: Reference, runs: list[Run]) -> tuple[list[str], list[str]]:
    """(row keys, column keys): the report's, plus any other swept key as a row key."""
    columns = list(reference.column_keys)
    rows = list(reference.row_keys)
    rows += [k for k in swept_keys(runs) if k != "seed" and k not in rows + columns]
    if any(len(r.rows) > 1 for r in runs):
        rows += [k for k in LABELS if k not in rows + columns]
    return rows, columns


def compare_report(reference: Reference, runs: list[Run]) -> Comparison | None:
    """Our completed runs of one report's experiment beside its figures (None: none done)."""
    done = [r for r in runs if r.status == "completed"]
    if not done:
        return None
    row_keys, column_keys = _layout(reference, done)
    groups: dict[tuple, list[tuple[dict, ReferenceRow | None]]] = {}
    shown: dict[tuple, tuple[tuple, tuple]] = {}
    for run in done:
        for row in run.rows or [run.results]:
            values = [_key_value(run, row, k) for k in row_keys + column_keys]
            key = tuple(_norm(v) for v in values)
            shown.setdefault(key, (tuple(values[: len(row_keys)]), tuple(values[len(row_keys) :])))
            matched = next((r for r in reference.rows if _matches(r, run, row)), None)
            groups.setdefault(key, []).append((row, matched))
    cells: dict[tuple, Cell] = {}
    for key, members in groups.items():
        refs = {id(m): m for _, m in members}
        ref_row = next(iter(refs.values())) if len(refs) == 1 else None
        row, column = shown[key]
        for figure in reference.figures:
            col = FIGURES[figure]
            ours = [float(r[col]) for r, _ in members if is_number(r.get(col)) and r[col] == r[col]]
            reported = ref_row.figures.get(figure) if ref_row else None
            cells[(row, column, figure)] = Cell(ours, reported, ref_row.source if ref_row else None)
    rows = list(dict.fromkeys(r for r, _ in shown.values()))
    columns = list(dict.fromkeys(c for _, c in shown.values()))
    rows.sort(key=_ranker(row_keys, reference, rows))
    columns.sort(key=_ranker(column_keys, reference, columns))
    comparison = Comparison(reference, row_keys, column_keys, rows, columns, cells, [])
    comparison.notes = _notes(comparison, runs, done)
    return comparison


def compare(runs: list[Run]) -> list[Comparison]:
    """One comparison per report among the runs (in the order first seen)."""
    by_report: dict[str, tuple[Reference, list[Run]]] = {}
    for run in runs:
        reference = _reference_of(run)
        if reference is not None:
            by_report.setdefault(reference.report, (reference, []))[1].append(run)
    found = [compare_report(ref, members) for ref, members in by_report.values()]
    return [c for c in found if c is not None]


def _seeds_note(comparison: Comparison, done: list[Run]) -> str:
    counts = sorted({len(c.ours) for c in comparison.cells.values() if c.ours}) or [0]
    diff = "diff: our mean minus the report's figure"
    if counts[-1] < 2:
        return "diff: ours minus the report's figure; one run per setting (no seed noise measured)"
    seeds = sorted({str(r.value("seed")) for r in done}, key=lambda s: (len(s), s))
    many = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (
        f"ours: mean ± standard deviation over the {many} runs of each setting "
        f"(seed {', '.join(seeds)}); {diff}"
    )


def _data_notes(done: list[Run]) -> list[str]:
    jpeg: dict[str, int] = {}
    other: dict[str, int] = {}
    for run in done:
        if (run.results.get("data") or run.value("data.name")) != "imagefolder":
            continue
        root = str(run.value("data.root"))
        found = jpeg if JPEG_FOLDER in PurePath(root).parts else other
        found[root] = found.get(root, 0) + 1
    notes = []
    for counts, text in ((jpeg, JPEG_NOTE), (other, FOLDER_NOTE)):
        if counts:
            roots = ", ".join(f"data.root={r}" for r in counts)
            notes.append(text.format(k=sum(counts.values()), n=len(done), roots=roots))
    return notes


def _setup_note(reference: Reference, done: list[Run]) -> str | None:
    """Where our runs left the report's own settings (its block's `setup`)."""
    found = []
    for key, theirs in reference.setup.items():
        ours: dict[tuple, list] = {}
        for run in done:
            value = run.value(key)
            value = run.results.get(key) if value is None else value
            if _norm(value) != _norm(theirs):
                ours.setdefault(_norm(value), [value, 0])[1] += 1
        if ours:
            values = ", ".join(
                f"{_show(key, v)} ({n} of {len(done)} runs)" for v, n in ours.values()
            )
            found.append(f"{key}={values} where the report has {_show(key, theirs)}")
    return "not the report's setup: " + "; ".join(found) if found else None


def _notes(comparison: Comparison, runs: list[Run], done: list[Run]) -> list[str]:
    reference = comparison.reference
    notes = [_seeds_note(comparison, done)]
    sources = dict.fromkeys(c.source for c in comparison.cells.values() if c.source)
    if sources:
        notes.append(f"the report's figures: {'; '.join(sources)}")
    notes += reference.notes
    notes += _data_notes(done)
    setup = _setup_note(reference, done)
    if setup:
        notes.append(setup)
    left = [r for r in runs if r.status != "completed"]
    if left:
        names = ", ".join(r.path.name for r in left[:3]) + (", ..." if len(left) > 3 else "")
        notes.append(f"{len(left)} of {len(runs)} runs did not complete and are left out: {names}")
    return notes


def reference_markdown(comparisons: list[Comparison]) -> str:
    """Every comparison's title, table and notes (reference.md)."""
    return "\n".join(c.markdown() for c in comparisons)


def write_reference(comparisons: list[Comparison], out_dir: Path) -> list[Path]:
    """reference.md and reference.csv in out_dir (nothing without a comparison)."""
    if not comparisons:
        return []
    out_dir = Path(out_dir)
    records = [r for c in comparisons for r in c.records()]
    keys = dict.fromkeys(k for c in comparisons for k in c.row_keys + c.column_keys)
    columns = ["report", *keys, *CSV_TAIL]
    written = [out_dir / "reference.md", out_dir / "reference.csv"]
    atomic.write_text(written[0], reference_markdown(comparisons))
    report.write_csv(written[1], records, columns)
    return written
