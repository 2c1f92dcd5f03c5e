"""Config folders of one's own, outside the package: `--config-dir DIR` (one folder) and
`hydra.searchpath=[file://DIR, pkg://module, ...]` (several). Each holds group folders like the
package's conf/ (model/NAME.yaml, experiment/NAME.yaml, ...); Hydra searches them after the
package's own, and the command-line checks (cli.preflight) compose and validate with them
exactly as Hydra will run.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cifar_run.errors import UserError

CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def split_config_dirs(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without its `--config-dir DIR` / `--config-dir=DIR` / `-cd DIR`, the DIRs)."""
    rest: list[str] = []
    dirs: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            value = value if eq else next(args, "")
            if not value:
                raise UserError(f"{flag}: needs a folder, e.g. {flag} my_configs")
            dirs.append(value)
        else:
            rest.append(arg)
    if len(dirs) > 1:  # Hydra takes the last one only
        raise UserError(
            f"--config-dir: given {len(dirs)} times; Hydra takes one folder (for several: "
            "hydra.searchpath=[file://DIR1,file://DIR2])"
        )
    return rest, dirs


def entries(config_dirs: Iterable[str], searchpath: Iterable[str] = ()) -> list[str]:
    """The search-path entries Hydra adds for these `--config-dir` folders and a
    `hydra.searchpath` list, in that order; a --config-dir that is no folder is a UserError."""
    found = []
    for folder in config_dirs:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise UserError(
                f"--config-dir {folder}: no such folder (a folder of model/*.yaml, ...)"
            )
        found.append(f"file://{path}")
    return found + [str(e) for e in searchpath]


def override(search: Sequence[str]) -> list[str]:
    """`hydra.searchpath=[...]` for Hydra's compose API (empty when there is nothing to add)."""
    if not search:
        return []
    quoted = ["'" + e.replace("'", "\\'") + "'" for e in search]  # Hydra's quoting
    return [f"hydra.searchpath=[{','.join(quoted)}]"]


def _folder(entry: str) -> Any:
    """The folder a search-path entry names (a Path, or a package's Traversable), or None."""
    scheme, sep, rest = entry.partition("://")
    if not sep:  # Hydra reads an entry without a scheme as a file path
        return Path(entry).expanduser()
    if scheme == "file":
        return Path(rest).expanduser()
    if scheme == "pkg":
        try:
            return importlib.resources.files(rest.replace("/", "."))
        except (ModuleNotFoundError, TypeError, ValueError):
            return None
    return None


def group_options(conf_dir: Path, search: Sequence[str] = ()) -> dict[str, list[str]]:
    """Config groups and their options: the package's conf/ and every search-path folder."""
    options: dict[str, set[str]] = {}
    for root in [conf_dir, *(_folder(e) for e in search)]:
        if root is None or not root.is_dir():
            continue
        for group in root.iterdir():
            if not group.is_dir() or group.name == "hydra" or group.name.startswith((".", "_")):
                continue
            names = {p.name[: -len(".yaml")] for p in group.iterdir() if p.name.endswith(".yaml")}
            options.setdefault(group.name, set()).update(names)
    return {group: sorted(names) for group, names in sorted(options.items())}
