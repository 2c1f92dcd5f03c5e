"""Every config key the README and docs/ list in their key tables exists in conf/: a key a
reader copies from the docs must not be an unknown-key error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .conftest import REPO

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Where the plain (undotted) names of a page's key tables are keys; elsewhere top-level keys.
PLAIN = {"models.md": "model", "speed.md": "speed", "sweeps.md": "hydra/launcher/slurm"}
TICKED = re.compile(r"`([A-Za-z_][\w.]*)`")


def _keys(pattern: str) -> set[str]:
    """The keys of conf/PATTERN.yaml, for every file the pattern matches."""
    keys: set[str] = set()
    for path in CONF.glob(f"{pattern}.yaml"):
        keys |= set(OmegaConf.to_container(OmegaConf.load(path)))
    return keys


def _tables(page: Path) -> list[tuple[str, str, list[list[str]]]]:
    """(section heading, header cells, rows of cells) of every table of a page."""
    tables, heading, rows = [], "", []
    for line in [*page.read_text().splitlines(), ""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            tables.append((heading, rows[0], [r for r in rows[2:] if r]))
            rows = []
    return tables


def _unparenthesized(cell: str) -> str:
    """A cell without its parenthesized parts (default values, allowed values)."""
    while (shorter := re.sub(r"\([^()]*\)", "", cell)) != cell:
        cell = shorter
    return cell


def _listed(page: Path) -> list[tuple[str, str]]:
    """(what was listed, where conf/ should have it) for every key the page's tables list."""
    found = []
    for heading, header, rows in _tables(page):
        # Config key tables have a default column (results.json's key tables have none).
        if header[0] == "key" and (header[1] == "default" or page.name in PLAIN):
            for row in rows:
                for name in TICKED.findall(row[0]):
                    group, _, key = name.rpartition(".")
                    if group == "hydra" or group.startswith("hydra."):
                        continue  # Hydra's own keys
                    found.append((name, group or PLAIN.get(page.name, "config"), key))
        elif header[0] == "option" and header[-1] == "keys (defaults)" and heading in GROUPS:
            for row in rows:
                option = TICKED.findall(row[0])[0]
                for key in TICKED.findall(_unparenthesized(row[-1])):
                    found.append((f"{heading}={option}: {key}", f"{heading}/{option}", key))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_key_the_docs_list_exists(page: Path) -> None:
    top = _keys("config")
    missing = []
    for listed, where, key in _listed(page):
        if where == "config":
            known = top
        elif "/" in where or where.startswith("hydra"):
            known = _keys(where) | top  # an option's row may name a top-level key it uses
        else:
            known = _keys(f"{where}/*")
        if key not in known:
            missing.append(f"{listed} (conf/{where})")
    assert not missing, f"{page.name} lists keys conf/ does not have: {missing}"


def test_the_tables_are_read_at_all() -> None:
    listed = {name for page in PAGES for name, _, _ in _listed(page)}
    assert {"batch_size", "data.val_size", "pruning.steps", "conv", "channels_last"} <= listed
    assert "sched=multistep: milestones" in listed and "mem_gb" in listed
