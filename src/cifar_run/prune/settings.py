"""Checking `prune` and the `pruning` config group; no torch import here, so that the CLI's
checks of a command line fail fast on a bad value, before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cifar_run.config.values import is_int
from cifar_run.errors import UserError

PRUNING_KEYS = (
    "include_classifier",
    "finetune_epochs",
    "finetune_lr",
    "steps",
    "curve",
    "early_stop",
)


@dataclass(frozen=True)
class PruningSettings:
    """Checked pruning settings; ``amount == 0`` means no pruning stage."""

    amount: float = 0.0
    include_classifier: bool = True
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    steps: int = 1
    curve: tuple[float, ...] = ()
    early_stop: int | None = None  # patience of the last step's fine-tuning

    @property
    def enabled(self) -> bool:
        return self.amount > 0.0

    def resolved_finetune_lr(self, run_lr: float) -> float:
        """``finetune_lr``, or the run's lr / 10 when it is null (see conf/pruning/default.yaml)."""
        return self.finetune_lr if self.finetune_lr is not None else run_lr / 10.0


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _is_fraction(value: Any) -> bool:
    """A real number (not bool, not a string) in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0.0 <= value < 1.0


def validate_pruning(prune: Any, pruning_cfg: Mapping[str, Any] | None) -> PruningSettings:
    """Check the top-level ``prune`` and the ``pruning`` group; UserError on the first bad key.

    ``pruning_cfg`` may be a dict or an OmegaConf DictConfig (only ``.get``/``in`` are used).
    Missing keys take the defaults of :class:`PruningSettings`.
    """
    if not _is_fraction(prune):
        raise UserError(f"prune={_show(prune)}: must be a number in [0, 1) (0 = no pruning)")
    cfg = pruning_cfg if pruning_cfg is not None else {}
    unknown = sorted(str(k) for k in cfg if k not in PRUNING_KEYS)
    if unknown:
        raise UserError(f"pruning.{unknown[0]}: unknown key (allowed: {', '.join(PRUNING_KEYS)})")
    defaults = PruningSettings()

    include_classifier = cfg.get("include_classifier", defaults.include_classifier)
    if not isinstance(include_classifier, bool):
        raise UserError(
            f"pruning.include_classifier={_show(include_classifier)}: must be true or false"
        )

    finetune_epochs = cfg.get("finetune_epochs", defaults.finetune_epochs)
    if not is_int(finetune_epochs) or finetune_epochs < 0:
        raise UserError(
            f"pruning.finetune_epochs={_show(finetune_epochs)}: must be an integer >= 0"
        )

    finetune_lr = cfg.get("finetune_lr", defaults.finetune_lr)
    if finetune_lr is not None and (
        isinstance(finetune_lr, bool)
        or not isinstance(finetune_lr, int | float)
        or not math.isfinite(finetune_lr)
        or finetune_lr <= 0
    ):
        raise UserError(
            f"pruning.finetune_lr={_show(finetune_lr)}: must be a number > 0, "
            "or null for the run's lr / 10"
        )

    steps = cfg.get("steps", defaults.steps)
    if not is_int(steps) or steps < 1:
        raise UserError(f"pruning.steps={_show(steps)}: must be an integer >= 1")

    curve = cfg.get("curve", defaults.curve)
    if curve is None:
        curve = ()
    if isinstance(curve, str) or not isinstance(curve, Sequence):
        raise UserError(
            f"pruning.curve={_show(curve)}: must be a list of numbers in [0, 1), e.g. [0.3,0.5,0.7]"
        )
    for value in curve:
        if not _is_fraction(value):
            raise UserError(
                f"pruning.curve={_show(curve)}: {_show(value)} is not a number in [0, 1)"
            )

    early_stop = cfg.get("early_stop", defaults.early_stop)
    if early_stop is not None and (not is_int(early_stop) or early_stop < 1):
        raise UserError(
            f"pruning.early_stop={_show(early_stop)}: must be a positive integer, or null "
            "(fine-tune all pruning.finetune_epochs)"
        )

    return PruningSettings(
        amount=float(prune),
        include_classifier=include_classifier,
        finetune_epochs=finetune_epochs,
        finetune_lr=None if finetune_lr is None else float(finetune_lr),
        steps=steps,
        curve=tuple(float(v) for v in curve),
        early_stop=early_stop,
    )
