"""A search's command line checked before Hydra starts (cifar_run.preflight calls it)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from cifar_run.search.settings import SearchSettings, require_optuna
from cifar_run.search.space import parse_space

SWEEPER = "hydra_plugins.cifar_run_optuna.optuna_sweeper.OptunaSweeper"


def is_search(hydra_cfg: DictConfig) -> bool:
    """Whether the composed config's sweeper is the Optuna search (hydra/sweeper=optuna)."""
    sweeper = OmegaConf.select(hydra_cfg, "hydra.sweeper")
    return isinstance(sweeper, DictConfig) and sweeper.get("_target_") == SWEEPER


def check_search(hydra_cfg: DictConfig, task: Sequence[str]) -> SearchSettings:
    """The sweeper's keys, Optuna installed, the search space of the config and `task`."""
    node = hydra_cfg.hydra.sweeper
    values = {k: node[k] for k in node if k != "_target_"}
    settings = SearchSettings.from_config(values)
    require_optuna()
    parse_space(settings.params, list(task))
    return settings
