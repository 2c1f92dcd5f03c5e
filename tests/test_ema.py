"""`ema`: a moving average of the weights is what a run validates, keeps, tests and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_run.config.checks import validate
from cifar_run.engine import checkpoint
from cifar_run.engine.ema import averaged_weights, step_function, weight_average
from cifar_run.errors import UserError
from cifar_run.models import build_model
from cifar_run.run import run, seed_everything

from .conftest import TINY, compose_cfg, largest_change, read_results, run_cli
from .test_resume import crash_then_resume


def test_average_follows_the_decay_from_the_starting_weights() -> None:
    model = nn.Linear(3, 2)
    ema = weight_average(model, 0.75)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, 0.75 * w0 + 0.25 * (w0 + 4.0))
    assert set(averaged_weights(ema.state_dict())) == set(model.state_dict())


def test_step_function_computes_what_averaged_model_computes() -> None:
    # ResNet-20 has BatchNorm buffers, its batch counters integers: both paths, bit for bit.
    torch.manual_seed(0)
    model = build_model(compose_cfg(["model=resnet20"]).model)
    theirs, ours = weight_average(model, 0.9), weight_average(model, 0.9)
    step = step_function(ours, model)
    for _ in range(3):
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.add_(torch.randn_like(tensor) if tensor.is_floating_point() else 7)
        theirs.update_parameters(model)
        step()
    expected = theirs.state_dict()
    assert int(expected["n_averaged"]) == 4
    assert expected.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(expected["module.fc.weight"], model.fc.weight)


def test_the_step_averages_every_float_tensor_in_one_lerp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Linear(512, 64), nn.Linear(64, 10))
    theirs, ours = weight_average(model, 0.9), weight_average(model, 0.9)
    lerp, seen = torch._foreach_lerp_, []

    def recording(averaged: list, *args: object) -> None:
        seen.append(sum(a.numel() for a in averaged))
        lerp(averaged, *args)

    step = step_function(ours, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(torch, "_foreach_lerp_", recording)
    step()
    monkeypatch.undo()  # AveragedModel's update calls it too
    theirs.update_parameters(model)
    assert seen == [sum(p.numel() for p in model.parameters())]
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_runs_evaluate_and_keep_the_average_not_the_trained_weights(tmp_path: Path) -> None:
    # A decay this close to 1 keeps the average at the initial weights while SGD at lr 1
    # moves the model: best.pt and last.pt must hold the average.
    args = [*TINY, "epochs=2", "lr=1.0", "ema=0.999999999"]
    cfg = compose_cfg(args)
    seed_everything(cfg.seed)
    start = build_model(cfg.model).state_dict()
    run(cfg, tmp_path)
    assert read_results(tmp_path)["ema"] == pytest.approx(0.999999999)
    for name in ("best.pt", "last.pt"):
        kept = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert largest_change(kept, start) < 1e-6, name
    state = checkpoint.load(checkpoint.state_path(tmp_path))
    assert largest_change(state.data["model"], start) > 1e-2  # the trained weights moved


def test_average_run_resumes_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 steps per epoch; the crash comes at epoch 2's second step, after epoch 1's checkpoint.
    args = [*TINY, "epochs=2", "ema=0.5", "deterministic=true"]
    crashed, _ = crash_then_resume(args, tmp_path, monkeypatch, at=5)
    assert checkpoint.load(checkpoint.state_path(crashed)).data["ema"] is not None
    assert "ema 0.5" in run_cli(*args, "dry_run=true", cwd=tmp_path).stdout


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "fast"])
def test_bad_ema_is_one_line_naming_the_key(value: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, f"ema={value}"]))
    assert str(info.value).startswith(f"ema={value}: must be a decay in (0, 1)")
