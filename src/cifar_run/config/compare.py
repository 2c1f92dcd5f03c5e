"""Which config keys change a run's numbers, and how two configs differ in them.

A resume, a pruning stage's resume point and a rerun into a sweep folder are all refused
when the config they would continue under differs from the run's own in such a key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that cannot change a run's numbers, so a resume may differ in them: the resume switch
# itself, where the decode cache lives, whether downloading is allowed, whether an unreadable
# image stops the run (a run that goes on has the same images either way), Hydra's own settings,
# an experiment's `reference` block (a report's published figures, read by the summary only),
# the loggers that watch the run.
# `device` is compared by kind (cpu / cuda) in `engine.resume.check_config`, not by spelling:
# `auto`, `cuda` and `cuda:1` may resume each other's runs, CPU and CUDA may not.
IGNORED_KEYS = (
    "speed.keep_heap",  # where freed memory goes: the same numbers either way
    "resume",
    "dry_run",
    "keep_state",
    "device",
    "data.cache_dir",
    "data.download",
    "data.strict",
    "hydra",
    "reference",
    "logger",
)

# Keys a saved config may lack whose default is not null: at that default they change
# nothing, so a saved config without the key and a current one with it compare as equal.
LATER_DEFAULTS = {
    "mix.name": "none",
    "optim.decay_norm_and_bias": True,
    # The speed group came later; a run saved without it trained as `speed=auto` does.
    "speed.name": "auto",
    **{
        f"speed.{key}": True
        for key in (
            "channels_last",
            "conv_grads",
            "keep_heap",
        )
    },
    "data.image_size": 32,
    "model.input_size": 32,
}

# Keys naming a folder or file, relative to the working directory of the command that set them.
PATH_KEYS = ("data.root", "ckpt_path")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as flat `dotted.key: value` pairs."""
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED_KEYS)


def config_snapshot(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as flat `dotted.key: value` pairs that affect the results."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {k: v for k, v in sorted(flatten(container).items()) if not _ignored(k)}


def _as_if_absent(key: str, value: Any) -> bool:
    """A null, or a LATER_DEFAULTS key at its default: the same as a config without the key."""
    return value is None or (key in LATER_DEFAULTS and LATER_DEFAULTS[key] == value)


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A hash of what config_diff compares: equal hashes for configs it finds no difference
    in (e.g. a saved config that lacks a key which the current one has at its default)."""
    kept = {k: v for k, v in config_snapshot(cfg).items() if not _as_if_absent(k, v)}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _folder(path: str, cwd: str) -> str:
    return os.path.realpath(os.path.join(cwd, os.path.expanduser(path)))


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], saved_cwd: str | None = None
) -> list[str]:
    """`key: saved -> current` for every result-affecting key that differs. A key set to
    null counts as absent, so a key with a null default (`early_stop`) that a saved config
    lacks sets no runs apart; nor does one at its LATER_DEFAULTS value.

    With `saved_cwd`, the working directory of the run that wrote `saved`, path keys are
    compared as the folders they name (`tests/data` there and its absolute path here agree);
    without it, as written."""
    old, new = config_snapshot(saved), config_snapshot(current)
    if saved_cwd is not None:
        for key in PATH_KEYS:
            was, now = old.get(key), new.get(key)
            if isinstance(was, str) and isinstance(now, str):
                if _folder(was, saved_cwd) == _folder(now, os.getcwd()):
                    old[key] = now
    for snapshot in (old, new):
        for key in [k for k in LATER_DEFAULTS if k in snapshot]:
            if _as_if_absent(key, snapshot[key]):
                del snapshot[key]
    absent = "<absent>"
    return [
        f"{k}: {old.get(k, absent)} -> {new.get(k, absent)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
