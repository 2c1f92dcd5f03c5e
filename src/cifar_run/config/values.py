"""Checks of single config values: each returns the value or raises a one-line UserError
naming the key, the value and what is allowed.

Booleans are not numbers here: YAML's `true` would otherwise pass as the integer 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cifar_run.errors import UserError

MAX_SEED = 2**32 - 1  # numpy's seed range; torch's is wider


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(key: str, value: Any) -> int:
    if not is_int(value) or value <= 0:
        raise UserError(f"{key}={value}: must be a positive integer")
    return value


def non_negative_int(key: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        raise UserError(f"{key}={value}: must be an integer >= 0")
    return value


def seed_value(key: str, value: Any) -> int:
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise UserError(f"{key}={value}: must be an integer in [0, {MAX_SEED}]")
    return value


def positive_number(key: str, value: Any) -> float:
    if not is_number(value) or not value > 0 or value != value or value == float("inf"):
        raise UserError(f"{key}={value}: must be a positive number")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value}: must be true or false")
    return value


def in_range(
    key: str,
    value: Any,
    lo: float,
    hi: float,
    allowed: str,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
) -> float:
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (value < hi if open_hi else value <= hi)
    if not ok:
        raise UserError(f"{key}={value}: must be {allowed}")
    return float(value)


def one_of(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{key}={value}: unknown; allowed: {', '.join(choices)}")
    return value


def number_pair(key: str, value: Any, lo: float, hi: float, allowed: str) -> None:
    """A [min, max] range of numbers with lo < min <= max <= hi."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(is_number(v) and math.isfinite(v) for v in value)
        or not lo < value[0] <= value[1] <= hi
    ):
        raise UserError(f"{key}={value}: must be [min, max] with {allowed}")
