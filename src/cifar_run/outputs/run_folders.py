"""Run folders as the summary sees them: what each says about itself, found under any path.

A run folder holds results.json (and results.csv, config.yaml, Hydra's .hydra/); a sweep
folder holds multirun.yaml and one job folder per job, which counts as a run even when its
job was killed before it wrote results.json (its status is then `missing`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_run.outputs import files as report

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SWEEP_FILE = "multirun.yaml"  # Hydra writes it into every sweep folder
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
MISSING = "missing"  # status of a job folder without results.json (killed before it started)


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
        from omegaconf import DictConfig

        value = self._select(key)
        if isinstance(value, DictConfig):  # a config group: its option's name
            return value.get("name")
        return value

    def section(self, key: str) -> Any:
        """A part of the run's saved config as plain containers (None without it)."""
        from omegaconf import DictConfig, ListConfig, OmegaConf

        value = self._select(key)
        if isinstance(value, DictConfig | ListConfig):
            try:
                return OmegaConf.to_container(value, resolve=True)
            except Exception:  # an interpolation that cannot resolve outside its run
                return None
        return value

    def _select(self, key: str) -> Any:
        from omegaconf import OmegaConf

        if self._config is None:
            for name in ("config.yaml", ".hydra/config.yaml"):
                if (self.path / name).is_file():
                    self._config = OmegaConf.load(self.path / name)
                    break
            else:
                self._config = {}
        if not self._config:
            return None
        try:
            return OmegaConf.select(self._config, key, throw_on_resolution_failure=False)
        except Exception:  # an interpolation that cannot resolve outside its run
            return None


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
