"""hydra/sweeper=optuna: an Optuna study run as a Hydra sweep (cifar_run.search.study).

Hydra finds sweepers by importing every module of the `hydra_plugins` namespace package at
start-up, so this module imports nothing heavy: Optuna loads only when a search runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Runs the study's missing trials through the configured launcher (one job per trial)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from cifar_run.errors import UserError
        from cifar_run.search.study import search

        assert self.config is not None
        try:
            return search(self.settings, self.config, self.launcher, arguments, self._validate)
        except UserError as exc:  # one line and exit status 2, as for every user mistake
            print(f"cifar-run: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def _validate(self, batch: Sequence[Sequence[str]]) -> None:
        self.validate_batch_is_legal(batch)
