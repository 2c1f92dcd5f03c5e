"""A search space in Hydra's sweep syntax, as Optuna distributions.

    lr: tag(log, interval(0.001, 0.3))       a float, log-uniform
    optim.momentum: interval(0.8, 0.99)      a float, uniform
    model.width: tag(int, interval(16, 64))  an integer (tag(int, log, ...) log-uniform)
    batch_size: choice(32, 64, 128)          one of these values
    seed: range(0, 5)                        one of 0 ... 4

The search space comes from hydra.sweeper.params and from sweep overrides on the command line
(`lr=tag(log,interval(1e-3,1))`); a plain value on the command line for a searched key fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cifar_run.errors import UserError

# Tags an interval may carry.
TAGS = ("log", "int")


@dataclass
class Space:
    distributions: dict[str, Any]  # key -> optuna distribution
    fixed: list[str]  # the overrides every trial gets as they are (data=..., epochs=...)


def _distribution(key: str, override: Any) -> Any:
    from hydra.core.override_parser.types import IntervalSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if override.is_choice_sweep() or override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise UserError(
                f"{key}={override.get_value_element_as_str()}: no values to choose from"
            )
        for value in values:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise UserError(f"{key}: choice values must be numbers, text or booleans")
        return CategoricalDistribution(values)
    value = override.value()
    if not isinstance(value, IntervalSweep):
        raise UserError(f"{key}={override.get_value_element_as_str()}: not a search range")
    unknown = sorted(set(value.tags) - set(TAGS))
    if unknown:
        raise UserError(f"{key}: unknown tag {unknown[0]}; allowed: {', '.join(TAGS)}")
    low, high, log = value.start, value.end, "log" in value.tags
    if not low < high or (log and low <= 0):
        what = "0 < low < high" if log else "low < high"
        raise UserError(f"{key}=interval({low:g}, {high:g}): needs {what}")
    if "int" in value.tags:
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(low, high, log=log)


def parse_space(params: Mapping[str, Any], arguments: Sequence[str]) -> Space:
    """hydra.sweeper.params, then the command line's overrides (the later wins for a key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as exc:  # Hydra's message names the override
        raise UserError(str(exc).strip().splitlines()[0]) from None
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            distributions[key] = _distribution(key, override)
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            distributions.pop(key, None)
    if not distributions:
        raise UserError(
            "hydra.sweeper.params: no search space; give ranges on the command line, e.g. "
            "'lr=tag(log,interval(0.001,0.3))', in hydra.sweeper.params, "
            "or use hparams_search=cifar_optuna"
        )
    return Space(distributions, list(fixed.values()))


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's values as overrides; a float keeps every digit (repr), so the same trial
    always gets the same job folder name."""
    return [f"{key}={_text(value)}" for key, value in params.items()]


def describe(space: Space) -> str:
    """The search space in one line: `lr in [0.001, 0.3] (log), batch_size in {32, 64}`."""
    parts = []
    for key, dist in sorted(space.distributions.items()):
        if hasattr(dist, "choices"):
            parts.append(f"{key} in {{{', '.join(_text(c) for c in dist.choices)}}}")
        else:
            parts.append(f"{key} in [{dist.low:g}, {dist.high:g}]" + (" (log)" if dist.log else ""))
    return ", ".join(parts)
