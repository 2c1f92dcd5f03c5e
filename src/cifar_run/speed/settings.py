"""The `speed` config group as plain values: which tricks a run may use (conf/speed/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cifar_run.errors import UserError


@dataclass(frozen=True)
class SpeedSettings:
    """The `speed` config group: each trick's switch (`speed=plain` turns all off)."""

    channels_last: bool = True  # NHWC batches for conv nets
    conv_grads: bool = True  # convolutions as matrix multiplies on small maps (CPU)
    keep_heap: bool = True  # the C heap keeps freed memory between steps (CPU, glibc)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SpeedSettings:
        """From the `speed` group (`name` aside); a missing group is `auto`."""
        if cfg is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"name"})
        if unknown:
            raise UserError(
                f"speed.{unknown[0]}: unknown key; known keys: name, {', '.join(sorted(known))}"
            )
        values = {}
        for key in known & set(cfg):
            if not isinstance(cfg[key], bool):
                raise UserError(f"speed.{key}={cfg[key]!r}: must be true or false")
            values[key] = cfg[key]
        return cls(**values)


AUTO = SpeedSettings()
PLAIN_SETTINGS = SpeedSettings(**{f.name: False for f in fields(SpeedSettings)})
