"""The `speed` group: `auto` applies the tricks that suit a model, `plain` none, each key one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_run.engine.precision import resolve_precision
from cifar_run.errors import UserError
from cifar_run.models import build_model
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run
from cifar_run.speed.conv_grad import TapConv2d
from cifar_run.speed.halves import MIN_WEIGHT_REUSE, BatchSplit, weight_reuse
from cifar_run.speed.settings import AUTO, PLAIN_SETTINGS, SpeedSettings
from cifar_run.speed.setup import batch_split, speed_setup

from .conftest import TINY, compose_cfg, run_cli

CPU = torch.device("cpu")


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_the_group_composes_to_its_settings() -> None:
    assert SpeedSettings.from_config(compose_cfg([]).speed) == AUTO
    assert SpeedSettings.from_config(compose_cfg(["speed=plain"]).speed) == PLAIN_SETTINGS
    one_off = SpeedSettings.from_config(compose_cfg(["speed.batch_halves=false"]).speed)
    assert one_off == SpeedSettings(batch_halves=False)


def test_plain_leaves_the_model_and_the_batches_as_torch_has_them(two_threads: None) -> None:
    model = LeNet5()
    speed = speed_setup(model, CPU, "fp32", settings=PLAIN_SETTINGS)
    assert speed.split is None
    assert speed.memory_format == torch.contiguous_format
    assert not any(isinstance(m, TapConv2d) for m in model.modules())
    assert hooks(model) == 0
    assert speed.batch_threads() is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    speed.optimizer(optimizer)
    assert not optimizer._optimizer_step_pre_hooks
    assert speed.describe() == "plain"


def test_auto_applies_each_trick_and_each_key_turns_one_off(two_threads: None) -> None:
    model = LeNet5()
    speed = speed_setup(model, CPU, "fp32", settings=AUTO)
    assert isinstance(speed.split, BatchSplit)
    assert speed.memory_format == torch.channels_last
    assert any(isinstance(m, TapConv2d) for m in model.modules())
    speed.close()
    off = SpeedSettings(batch_halves=False, conv_grads=False, channels_last=False)
    model = LeNet5()
    speed = speed_setup(model, CPU, "fp32", settings=off)
    assert speed.split is None and speed.memory_format == torch.contiguous_format
    assert not any(isinstance(m, TapConv2d) for m in model.modules())
    assert hooks(model) > 0  # op_threads: small ops on one thread once the batch is whole


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+speed.turbo=true", "unknown key 'speed.turbo'; known keys: batch_halves, channels_last"),
        ("speed.batch_halves=3", "speed.batch_halves=3: must be true or false"),
    ],
)
def test_bad_speed_keys_are_one_line(override: str, message: str, tmp_path: Path) -> None:
    proc = run_cli(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_settings_refuse_what_is_not_a_switch() -> None:
    with pytest.raises(UserError, match="speed.op_threads='yes': must be true or false"):
        SpeedSettings.from_config({"name": "auto", "op_threads": "yes"})


def test_a_plain_run_trains_whole_batches_and_says_so(tmp_path: Path, two_threads: None) -> None:
    results = run(compose_cfg([*TINY, "speed=plain"]), tmp_path)
    assert results["status"] == "completed"
    assert results["speed"] == "plain" and results["batch_halves"] is False
    assert json.loads((tmp_path / "results.json").read_text())["speed"] == "plain"


def test_halves_skip_nets_whose_weights_meet_few_pixels(two_threads: None) -> None:
    # torchvision's ResNet-18 on 32x32 images: 3.3 multiply-adds per weight per image.
    tv = build_model(compose_cfg(["model=resnet18_tv"]).model)
    assert weight_reuse(tv) < MIN_WEIGHT_REUSE <= weight_reuse(LeNet5())
    fp32 = resolve_precision("fp32", CPU)
    assert batch_split(tv, CPU, fp32) is None
    split = batch_split(LeNet5(), CPU, fp32)
    assert isinstance(split, BatchSplit)
    split.close()


def test_weight_reuse_leaves_the_model_as_it_was() -> None:
    model = build_model(compose_cfg(["model=resnet20"]).model)
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # mixed modes
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert weight_reuse(model) > 100  # 32x32 to 8x8 maps: every weight meets many pixels
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())
