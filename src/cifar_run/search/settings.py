"""The keys of hydra/sweeper=optuna (conf/hydra/sweeper/optuna.yaml), checked."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from cifar_run.errors import UserError

SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"hydra.sweeper.{key}={value}: must be a positive integer")
    return value


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserError(f"hydra.sweeper.{key}={value}: allowed: {', '.join(allowed)}")
    return str(value)


@dataclass
class SearchSettings:
    n_trials: int = 20  # trials in the study in all: a rerun runs only those still missing
    n_jobs: int = 1  # trials launched together
    metric: str = "best_val_acc"  # the results.json key the study optimises
    direction: str = "maximize"
    sampler: str = "tpe"
    seed: int | None = 0
    study_name: str = "cifar-run"
    storage: str | None = None  # the journal file; None: <sweep dir>/optuna.journal
    params: dict[str, Any] = field(default_factory=dict)  # key -> search range

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SearchSettings:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        known = [f.name for f in fields(cls)]
        plain = {
            str(k): OmegaConf.to_container(v) if isinstance(v, DictConfig) else v
            for k, v in values.items()
        }
        unknown = sorted(set(plain) - set(known))
        if unknown:
            raise UserError(
                f"hydra.sweeper.{unknown[0]}: unknown key; known keys: {', '.join(known)}"
            )
        if plain.get("n_jobs") == -1:  # the launcher's "one per core"
            plain["n_jobs"] = os.cpu_count() or 1
        settings = cls(**plain)
        settings.check()
        return settings

    def check(self) -> None:
        _positive_int("n_trials", self.n_trials)
        _positive_int("n_jobs", self.n_jobs)
        _one_of("direction", self.direction, DIRECTIONS)
        _one_of("sampler", self.sampler, SAMPLERS)
        if not isinstance(self.metric, str) or not self.metric:
            raise UserError(f"hydra.sweeper.metric={self.metric}: must be a results.json key")
        if self.metric.startswith("test"):
            # Choosing on the test set would make its accuracy an optimistic estimate.
            raise UserError(
                f"hydra.sweeper.metric={self.metric}: a search must not select on the test set; "
                "use a validation key such as best_val_acc"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise UserError(f"hydra.sweeper.seed={self.seed}: must be an integer or null")
        if not isinstance(self.study_name, str) or not self.study_name.strip():
            raise UserError(f"hydra.sweeper.study_name={self.study_name}: must be a name")
        if self.storage is not None and not isinstance(self.storage, str):
            raise UserError(f"hydra.sweeper.storage={self.storage}: must be a file path or null")
        if not isinstance(self.params, dict):
            raise UserError(f"hydra.sweeper.params={self.params}: must map keys to search ranges")


def require_optuna() -> Any:
    """The optuna module, or the one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise UserError(
            "hydra/sweeper=optuna: needs the optuna package, which is not installed: "
            'pip install "cifar-run[search]"'
        ) from None
    return optuna
