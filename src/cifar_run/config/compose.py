"""Where the config groups live, and the config a command line composes (without a Hydra run)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from cifar_run.config.search import group_options


def conf_dir() -> Path:
    """`conf/`: inside the package in a wheel, at the repository root in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    if packaged.is_dir():
        return packaged
    return package.parents[1] / "conf"


CONF_DIR = conf_dir()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `cifar-run OVERRIDES` would run, composed without a Hydra run (no run
    folder, no logging set-up): for scripts and tests."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def groups(search: Sequence[str] = ()) -> dict[str, list[str]]:
    """Config groups and their options, read from conf/ and the search-path entries `search`
    (folders of one's own: config.search)."""
    return group_options(CONF_DIR, search)
