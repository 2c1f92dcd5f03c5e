"""The `reference` block of an experiment config: a report's published figures.

conf/experiment/reportNNN.yaml quotes its report's numbers here, each with where in the
report it stands; the sweep summary (outputs.reference) sets our runs beside them. The block
changes nothing a run computes (config.compare ignores it), but it is checked with the rest
of the config, so that a typo fails before training rather than at the end of a sweep.

    reference:
      report: "000"                      # the report's number (a string: YAML reads 000 as 0)
      title: LeNet-5 and ResNet-18 ...   # optional
      file: ../shared/seeds/000_....txt  # optional: the report's text
      table: {rows: [batch_size], columns: [model, pruned]}  # optional: the report's layout
      setup: {epochs: 10, data: {val_size: 10000}}  # optional: the report's settings
      notes: ["..."]                     # optional: where the comparison is not like for like
      rows:                              # the figures: keys to match, then val_acc / test_acc
        - {batch_size: 64, model: resnet18_tv, pruned: false, val_acc: 73.34,
           test_acc: 72.67, source: Table 1}

A row's keys other than the figures and `source` say which of our runs it stands beside:
config keys (`batch_size`, `model`, `lr`, dotted for groups: `data.val_size`) or `pruned`
(the dense or the pruned row of a pruning run). A row without such keys matches every run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cifar_run.config.compare import flatten
from cifar_run.config.values import in_range
from cifar_run.errors import UserError

# The figures a row may give, in percent, and the results column each compares with.
FIGURES = {"val_acc": "best_val_acc", "test_acc": "test_acc"}
BLOCK_KEYS = ("report", "title", "file", "table", "setup", "notes", "rows")
TABLE_KEYS = ("rows", "columns")
SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class ReferenceRow:
    """One row of the report's figures and the runs it stands beside."""

    match: dict[str, Any]  # key -> value that a run (or a row of a run) must have
    figures: dict[str, float]  # `val_acc` / `test_acc` -> percent
    source: str  # where in the report


@dataclass(frozen=True)
class Reference:
    """A report's published figures, as an experiment config quotes them."""

    report: str
    rows: tuple[ReferenceRow, ...]
    title: str = ""
    file: str = ""
    row_keys: tuple[str, ...] = ()  # the report's table: one row per value of these keys
    column_keys: tuple[str, ...] = ()  # and one group of columns per value of these
    setup: dict[str, Any] = field(default_factory=dict)  # flat dotted keys
    notes: tuple[str, ...] = ()

    @property
    def figures(self) -> list[str]:
        """The figures any row gives, in FIGURES order."""
        return [f for f in FIGURES if any(f in row.figures for row in self.rows)]


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}={value}: must be a non-empty text")
    return value


def _texts(where: str, value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise UserError(f"{where}={value}: must be a list of {what}")
    return tuple(_text(f"{where}[{i}]", v) for i, v in enumerate(value))


def _setup(where: str, node: Any) -> dict[str, Any]:
    """{data: {val_size: 1}} -> {"data.val_size": 1}; each value a scalar or null."""
    if not isinstance(node, Mapping):
        raise UserError(f"{where}={node}: must be a mapping of config keys and values")
    flat = flatten(node)
    for key, value in flat.items():
        if value is not None and not isinstance(value, SCALARS):
            raise UserError(f"{where}.{key}={value}: must be a single value")
    return flat


def _row(where: str, node: Any) -> ReferenceRow:
    if not isinstance(node, Mapping):
        raise UserError(f"{where}={node}: must be a mapping of keys, figures and source")
    figures: dict[str, float] = {}
    for name in FIGURES:
        if name in node:
            allowed = "a percentage in [0, 100]"
            figures[name] = in_range(f"{where}.{name}", node[name], 0, 100, allowed)
    if not figures:
        raise UserError(f"{where}: gives no figure; give {' and/or '.join(FIGURES)} (percent)")
    source = _text(f"{where}.source", node.get("source"))
    match = {}
    for key, value in node.items():
        if key in FIGURES or key == "source":
            continue
        if not isinstance(value, SCALARS):
            raise UserError(f"{where}.{key}={value}: a key to match must have a single value")
        match[str(key)] = value
    return ReferenceRow(match, figures, source)


def parse_reference(node: Any) -> Reference | None:
    """The `reference` block (a DictConfig or plain mapping) checked, or None without one;
    UserError names the first bad key."""
    if node is None:
        return None
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise UserError(f"reference={node}: must be a mapping with `report` and `rows`")
    unknown = sorted(str(k) for k in node if k not in BLOCK_KEYS)
    if unknown:
        raise UserError(f"reference.{unknown[0]}: unknown key; allowed: {', '.join(BLOCK_KEYS)}")
    report = node.get("report")
    if isinstance(report, int) and not isinstance(report, bool):
        raise UserError(f'reference.report={report}: must be text; quote it ("{report:03d}")')
    report = _text("reference.report", report)
    rows = node.get("rows")
    if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
        raise UserError(f"reference.rows={rows}: must be a non-empty list of figures")
    table = node.get("table") or {}
    if not isinstance(table, Mapping) or set(table) - set(TABLE_KEYS):
        raise UserError(f"reference.table={table}: must be a mapping of rows and/or columns")
    notes = node.get("notes") or []
    return Reference(
        report=report,
        rows=tuple(_row(f"reference.rows[{i}]", r) for i, r in enumerate(rows)),
        title=_text("reference.title", node["title"]) if "title" in node else "",
        file=_text("reference.file", node["file"]) if "file" in node else "",
        row_keys=_texts("reference.table.rows", table.get("rows", []), "key names"),
        column_keys=_texts("reference.table.columns", table.get("columns", []), "key names"),
        setup=_setup("reference.setup", node.get("setup") or {}),
        notes=_texts("reference.notes", notes, "texts"),
    )
