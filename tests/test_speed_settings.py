"""The `speed` group: `auto` applies the tricks that suit a model, `plain` none, each key one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_run.errors import UserError
from cifar_run.models import build_model
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run
from cifar_run.speed.conv_grad import TapConv2d
from cifar_run.speed.settings import AUTO, PLAIN_SETTINGS, SpeedSettings
from cifar_run.speed.setup import speed_setup

from .conftest import TINY, compose_cfg, one_line, run_cli

CPU = torch.device("cpu")


def test_the_group_composes_to_its_settings() -> None:
    assert SpeedSettings.from_config(compose_cfg([]).speed) == AUTO
    assert SpeedSettings.from_config(compose_cfg(["speed=plain"]).speed) == PLAIN_SETTINGS
    one_off = SpeedSettings.from_config(compose_cfg(["speed.conv_grads=false"]).speed)
    assert one_off == SpeedSettings(conv_grads=False)


def test_plain_leaves_the_model_and_the_batches_as_torch_has_them() -> None:
    model = build_model(compose_cfg(["model=resnet20"]).model)
    speed = speed_setup(model, CPU, "bf16", settings=PLAIN_SETTINGS)
    assert speed.memory_format == torch.contiguous_format
    assert not any(isinstance(m, TapConv2d) for m in model.modules())
    assert speed.net is model and speed.describe() == "plain"


def test_auto_applies_each_trick_and_each_key_turns_one_off() -> None:
    model = LeNet5()
    speed = speed_setup(model, CPU, "fp32", settings=AUTO)
    assert speed.memory_format == torch.channels_last
    assert any(isinstance(m, TapConv2d) for m in model.modules())
    assert speed.describe() == "channels_last, conv_grads, keep_heap"
    model = LeNet5()
    speed = speed_setup(model, CPU, "fp32", settings=SpeedSettings(conv_grads=False))
    assert speed.memory_format == torch.channels_last
    assert not any(isinstance(m, TapConv2d) for m in model.modules())
    speed = speed_setup(LeNet5(), CPU, "fp32", settings=SpeedSettings(channels_last=False))
    assert speed.memory_format == torch.contiguous_format


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+speed.turbo=true", "unknown key 'speed.turbo'; known keys: channels_last, conv_grads"),
        ("speed.conv_grads=3", "speed.conv_grads=3: must be true or false"),
    ],
)
def test_bad_speed_keys_are_one_line(override: str, message: str, tmp_path: Path) -> None:
    proc = run_cli(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in one_line(proc.stderr)


def test_settings_refuse_what_is_not_a_switch() -> None:
    with pytest.raises(UserError, match="speed.keep_heap='yes': must be true or false"):
        SpeedSettings.from_config({"name": "auto", "keep_heap": "yes"})
    with pytest.raises(UserError, match="speed.batch_halves: unknown key; known keys: name, "):
        SpeedSettings.from_config({"name": "auto", "batch_halves": True})


def test_a_plain_run_says_so_in_its_results(tmp_path: Path) -> None:
    results = run(compose_cfg([*TINY, "speed=plain"]), tmp_path)
    assert results["status"] == "completed" and results["speed"] == "plain"
    assert json.loads((tmp_path / "results.json").read_text())["speed"] == "plain"
