"""The `logger` config group: which loggers a run feeds, their keys, and the extras they need."""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_run.errors import UserError

# Logger name -> (the module it imports, the optional dependency group that installs it).
EXTRAS: dict[str, tuple[str | None, str | None]] = {
    "csv": (None, None),
    "tensorboard": ("tensorboard", "track"),
    "mlflow": ("mlflow", "track"),
}
# Keys of each logger's node (conf/logger/<name>.yaml) and the kind of value each takes.
KEYS: dict[str, dict[str, str]] = {
    "csv": {"every_n_steps": "int"},
    "tensorboard": {"every_n_steps": "int"},
    "mlflow": {
        "every_n_steps": "int",
        "tracking_uri": "str",
        "experiment": "str",
        "run_name": "str",
    },
}


def selected(cfg: DictConfig) -> dict[str, DictConfig]:
    """The chosen loggers and their settings, in the order the config lists them."""
    node = cfg.get("logger")
    if not isinstance(node, DictConfig):
        return {}
    return {str(name): node[name] for name in node}


def missing_extra(name: str) -> str | None:
    """The `pip install` line a logger still needs, or None when it can run."""
    module, extra = EXTRAS[name]
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except ImportError:  # a broken or blocked install counts as missing
        pass
    return f'pip install "cifar-run[{extra}]"'


def check_loggers(cfg: DictConfig) -> None:
    """Known loggers, known keys with values of the right kind, their packages installed."""
    node = cfg.get("logger")
    if node is not None and not isinstance(node, DictConfig):
        raise UserError(
            f"logger={node}: must be logger options, e.g. logger=[csv,tensorboard]; "
            f"allowed: {', '.join(EXTRAS)}"
        )
    for name, settings in selected(cfg).items():
        if name not in EXTRAS:
            raise UserError(f"logger.{name}: unknown logger; allowed: {', '.join(EXTRAS)}")
        if not isinstance(settings, DictConfig):
            raise UserError(f"logger.{name}={settings}: must hold the logger's keys")
        for key, value in settings.items():
            _check_key(name, str(key), value)
        install = missing_extra(name)
        if install is not None:
            module = EXTRAS[name][0]
            raise UserError(
                f"logger={name}: needs the {module} package, which is not installed: {install}"
            )


def _check_key(name: str, key: str, value: Any) -> None:
    kind = KEYS[name].get(key)
    full = f"logger.{name}.{key}"
    if kind is None:
        raise UserError(f"{full}: unknown key; known keys: {', '.join(KEYS[name])}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{full}={value}: must be a positive integer")
    if kind == "str" and value is not None and (not isinstance(value, str) or not value.strip()):
        raise UserError(f"{full}={value}: must be a non-empty text, or null")


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as `dotted.key: value` pairs, the loggers' own keys left out: what
    the trackers record as the run's hyperparameters."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(container, "")
    return {k: v for k, v in flat.items() if not (k == "logger" or k.startswith("logger."))}
