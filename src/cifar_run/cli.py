"""Command line: `cifar-run` (the Hydra app) and `cifar-report`.

User mistakes become one line on stderr and exit status 2, before any data is loaded:
`main` composes and validates the config from the command line first (Hydra's own
messages span several lines and exit with 1), then hands over to `@hydra.main`.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_run.errors import UserError

EXIT_USER_ERROR = 2


def conf_dir() -> Path:
    """`conf/`: inside the package in a wheel, at the repository root in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = conf_dir()

# Hydra flags that print or do something other than a run: leave them to Hydra untouched.
_HYDRA_ONLY_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--experimental-rerun",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--package",
    "-p",
    "--resolve",
}
_MULTIRUN_FLAGS = {"--multirun", "-m"}


def fail(message: str, prog: str = "cifar-run") -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def groups() -> dict[str, list[str]]:
    """Config groups and their options, read from conf/."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def _compose_error(exc: BaseException, overrides: list[str], base: DictConfig) -> str:
    text = str(exc)
    while not text.strip() and exc.__cause__ is not None:  # Hydra wraps some errors bare
        exc = exc.__cause__
        text = str(exc)
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text
    )
    if match:
        key = match.group(1)
        given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        known = sorted(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = (
            f"did you mean {'.'.join(filter(None, [parent, close[0]]))}?"
            if close
            else (f"known keys: {', '.join(known)}")
        )
        return f"{given}: unknown key '{key}'; {hint}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _check_group_choices(parsed: list, options: dict[str, list[str]]) -> None:
    for override in parsed:
        group = override.key_or_group
        if group not in options or override.is_delete():
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        for value in values:
            if str(value) not in options[group]:
                fail(
                    f"{group}={value}: unknown {group}; choose one of: {', '.join(options[group])}"
                )


def preflight(argv: list[str]) -> None:
    """Compose and validate every job the command line asks for; exit 2 on a mistake."""
    if any(a.split("=")[0] in _HYDRA_ONLY_FLAGS for a in argv):
        return
    multirun = any(a in _MULTIRUN_FLAGS for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cifar_run.config import validate

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # the parser's message names the bad override
        fail(str(exc).strip().splitlines()[0])
    task = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    _check_group_choices(task, groups())
    sweeps = [o.input_line for o in task if o.is_sweep_override()]
    if sweeps and not multirun:
        fail(f"{sweeps[0]}: several values need multirun; add -m")
    jobs = BasicSweeper.split_arguments(task, None)[0] if task else [[]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(config_name="config")
        for job in jobs:
            try:
                cfg = compose(config_name="config", overrides=job)
            except Exception as exc:
                fail(_compose_error(exc, job, base))
            if not multirun:
                # In a sweep a bad value fails its own job only; the others still run.
                try:
                    validate(cfg)
                except UserError as exc:
                    fail(str(exc))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from cifar_run.run import run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, None if cfg.dry_run else out_dir)
    except UserError as exc:
        fail(str(exc))


def main() -> None:
    """Entry point of `cifar-run`."""
    preflight(sys.argv[1:])
    _hydra_main()


def report_main() -> None:
    """Entry point of `cifar-report` (sweep tables and plots; see the sweeps issue)."""
    print(
        "cifar-report: not implemented yet; each run folder already holds results.md",
        file=sys.stderr,
    )
    raise SystemExit(1)
