"""Unit tests for cifar_run.prune.masks: tiny models and random tensors only."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import prune as torch_prune

from cifar_run.errors import UserError
from cifar_run.models.lenet import LeNet5
from cifar_run.prune.masks import (
    apply_global_l1,
    checkpoint_sizes,
    effective_weight,
    fully_pruned_layers,
    global_sparsity,
    make_permanent,
    prunable_parameters,
    prune_copy,
    sparsity_table,
    step_targets,
)
from cifar_run.prune.settings import PruningSettings, validate_pruning

LENET_PRUNABLE = 6 * 3 * 25 + 16 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10  # 61,770


def lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5()


class SmallBN(nn.Module):
    """Conv-BN-ReLU, pool, Linear-BN1d, Linear: biases and BatchNorm everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.bn1(self.fc1(x))))


def zeros_in(params) -> int:
    return sum(int((effective_weight(m, n) == 0).sum()) for m, n in params)


def prunable_zeros_in_state_dict(model: nn.Module, state: dict) -> tuple[int, int]:
    """(zeros, weights) over the Conv2d/Linear weights of a plain state dict."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            w = state[f"{name}.weight"]
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros, total


# --- selection ---------------------------------------------------------------------------


def test_prunable_parameters_lenet() -> None:
    model = lenet()
    params = prunable_parameters(model)
    assert len(params) == 5
    assert all(n == "weight" for _, n in params)
    assert sum(getattr(m, n).numel() for m, n in params) == LENET_PRUNABLE

    without = prunable_parameters(model, include_classifier=False)
    assert len(without) == 4
    assert model.classifier[-1] not in [m for m, _ in without]


def test_empty_selection_raises_user_error() -> None:
    with pytest.raises(UserError, match=r"^pruning\.include_classifier: selects no Conv2d/Linear"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(UserError, match="include_classifier=False"):
        prunable_parameters(nn.Sequential(nn.Linear(3, 2)), include_classifier=False)


# --- exact sparsity ----------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.0, 0.5, 0.9])
def test_exact_sparsity_lenet(amount: float) -> None:
    model = lenet()
    params = prunable_parameters(model)
    apply_global_l1(params, amount)
    assert zeros_in(params) == round(amount * LENET_PRUNABLE)
    rows = sparsity_table(model, params)
    assert sum(r["zeros"] for r in rows) == round(amount * LENET_PRUNABLE)
    assert global_sparsity(rows) == pytest.approx(amount, abs=1 / LENET_PRUNABLE)


def test_rounding_matches_torch_on_a_half() -> None:
    """5 weights at 0.5 -> 2.5 -> Python's round gives 2 (half to even), as torch does."""
    ours = nn.Linear(5, 1, bias=False)
    theirs = nn.Linear(5, 1, bias=False)
    theirs.load_state_dict(ours.state_dict())
    apply_global_l1([(ours, "weight")], 0.5)
    torch_prune.global_unstructured(
        [(theirs, "weight")], pruning_method=torch_prune.L1Unstructured, amount=0.5
    )
    assert int((ours.weight_mask == 0).sum()) == 2 == round(2.5)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_global_threshold_is_global() -> None:
    """Weights are ranked across layers: the layer with the smallest weights goes first."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[1].weight.fill_(1.0)
    params = prunable_parameters(model)
    apply_global_l1(params, 0.5)
    rows = sparsity_table(model, params)
    assert [r["sparsity"] for r in rows] == [1.0, 0.0]
    assert fully_pruned_layers(rows) == ["0.weight"]


def test_sparsity_table_rows() -> None:
    model = lenet()
    params = prunable_parameters(model)
    apply_global_l1(params, 0.5)
    rows = sparsity_table(model, params)
    assert [r["name"] for r in rows] == [
        "features.0.weight",
        "features.3.weight",
        "classifier.1.weight",
        "classifier.3.weight",
        "classifier.5.weight",
    ]
    assert rows[0]["shape"] == "6x3x5x5"
    assert rows[0]["weights"] == 450
    assert all(0 <= r["sparsity"] <= 1 for r in rows)
    assert fully_pruned_layers(rows) == []


# --- iterative pruning -------------------------------------------------------------------


def test_step_targets() -> None:
    assert step_targets(0.5, 1) == [0.5]
    assert step_targets(0.9, 3) == pytest.approx([0.3, 0.6, 0.9])
    assert step_targets(0.9, 3)[-1] == 0.9
    with pytest.raises(ValueError):
        step_targets(0.5, 0)


def test_iterative_steps_reach_the_same_total() -> None:
    amount, steps = 0.5, 3
    model = lenet()
    params = prunable_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for k, target in enumerate(step_targets(amount, steps), start=1):
        apply_global_l1(params, target)
        assert zeros_in(params) == round(amount * k / steps * LENET_PRUNABLE)
        for _ in range(2):  # "fine-tune" between steps
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert zeros_in(params) == round(amount * LENET_PRUNABLE)
    make_permanent(model)
    zeros, total = prunable_zeros_in_state_dict(model, model.state_dict())
    assert (zeros, total) == (round(amount * LENET_PRUNABLE), LENET_PRUNABLE)


def test_iterative_without_finetuning_equals_one_shot() -> None:
    one, many = lenet(), lenet()
    apply_global_l1(prunable_parameters(one), 0.6)
    many_params = prunable_parameters(many)
    for target in step_targets(0.6, 4):
        apply_global_l1(many_params, target)
    for (m1, _), (m2, _) in zip(prunable_parameters(one), many_params, strict=True):
        assert torch.equal(m1.weight_mask, m2.weight_mask)


def test_cannot_unprune() -> None:
    params = prunable_parameters(lenet())
    apply_global_l1(params, 0.5)
    with pytest.raises(ValueError, match="cannot be undone"):
        apply_global_l1(params, 0.3)
    with pytest.raises(ValueError):
        apply_global_l1(params, 1.0)


# --- masks hold during fine-tuning ---------------------------------------------------------


def test_masked_weights_stay_zero_with_momentum_and_weight_decay() -> None:
    model = lenet()
    params = prunable_parameters(model)
    apply_global_l1(params, 0.5)
    masks = [m.weight_mask.clone() for m, _ in params]
    origs = [m.weight_orig[m.weight_mask == 0].detach().clone() for m, _ in params]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model(torch.randn(1, 3, 32, 32))  # refresh module.weight through the pre-hook
    for (m, _), mask in zip(params, masks, strict=True):
        assert torch.equal(m.weight_mask, mask)
        assert torch.all(m.weight[mask == 0] == 0)
        assert torch.all(effective_weight(m)[mask == 0] == 0)
    # Weight decay and momentum moved the stored originals under the mask; that is why only
    # the effective weight (orig * mask) is meaningful while the masks are attached.
    assert any(
        not torch.equal(m.weight_orig[mask == 0], orig)
        for (m, _), mask, orig in zip(params, masks, origs, strict=True)
    )
    assert zeros_in(params) == round(0.5 * LENET_PRUNABLE)
    make_permanent(model)
    zeros, _ = prunable_zeros_in_state_dict(model, model.state_dict())
    assert zeros == round(0.5 * LENET_PRUNABLE)


# --- make_permanent ------------------------------------------------------------------------


def test_make_permanent_state_dict_loads_strictly(tmp_path) -> None:
    model = lenet()
    apply_global_l1(prunable_parameters(model), 0.5)
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    make_permanent(model)
    assert not torch_prune.is_pruned(model)
    state = model.state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    torch.save(state, tmp_path / "pruned.pt")

    fresh = lenet(seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    zeros, total = prunable_zeros_in_state_dict(fresh, fresh.state_dict())
    assert zeros == round(0.5 * total)


def test_batchnorm_and_biases_untouched() -> None:
    torch.manual_seed(0)
    model = SmallBN()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # give the running stats non-default values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = prunable_parameters(model)
    assert [m for m, _ in params] == [model.conv, model.fc1, model.fc2]
    apply_global_l1(params, 0.7)
    make_permanent(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        if key in {"conv.weight", "fc1.weight", "fc2.weight"}:
            changed = after[key] != value
            assert torch.all(after[key][changed] == 0)  # pruning only zeroes weights
        else:
            assert torch.equal(after[key], value), key
    total = sum(before[k].numel() for k in ("conv.weight", "fc1.weight", "fc2.weight"))
    assert sum(int((after[k] == 0).sum()) for k in ("conv.weight", "fc1.weight", "fc2.weight")) == (
        round(0.7 * total)
    )


# --- curve helper ------------------------------------------------------------------------


def test_prune_copy_leaves_original_unchanged() -> None:
    model = lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = {a: prune_copy(model, a) for a in (0.3, 0.5, 0.9)}
    assert not torch_prune.is_pruned(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    for amount, pruned in copies.items():
        assert not torch_prune.is_pruned(pruned)
        zeros, total = prunable_zeros_in_state_dict(pruned, pruned.state_dict())
        assert zeros == round(amount * total)

    dense_head = prune_copy(model, 0.5, include_classifier=False)
    assert int((dense_head.classifier[-1].weight == 0).sum()) == 0


def test_prune_copy_rejects_masked_model() -> None:
    model = lenet()
    apply_global_l1(prunable_parameters(model), 0.5)
    with pytest.raises(ValueError, match="dense model"):
        prune_copy(model, 0.7)


# --- checkpoint sizes ----------------------------------------------------------------------


def test_checkpoint_sizes() -> None:
    model = lenet()
    dense = checkpoint_sizes(model.state_dict())
    pruned = prune_copy(model, 0.9)
    sparse = checkpoint_sizes(pruned.state_dict())
    assert dense["bytes"] > LENET_PRUNABLE * 4
    assert abs(sparse["bytes"] - dense["bytes"]) < 1024  # zeros still cost 4 bytes raw
    assert sparse["gzip_bytes"] < 0.5 * dense["gzip_bytes"]
    assert checkpoint_sizes(model.state_dict()) == dense  # deterministic


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, -0.1, "abc", 1, 1.0, True, float("nan"), None, [0.5]])
def test_validate_rejects_bad_prune(bad) -> None:
    message = r"^prune=.*: must be a number in \[0, 1\) \(0 = no pruning\)$"
    with pytest.raises(UserError, match=message):
        validate_pruning(bad, {})


def test_validate_messages() -> None:
    with pytest.raises(UserError) as err:
        validate_pruning(1.5, {})
    assert str(err.value) == "prune=1.5: must be a number in [0, 1) (0 = no pruning)"
    with pytest.raises(UserError) as err:
        validate_pruning("abc", {})
    assert str(err.value) == "prune=abc: must be a number in [0, 1) (0 = no pruning)"


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"curve": [0.3, 1.2]}, "pruning.curve"),
        ({"curve": [-0.1]}, "pruning.curve"),
        ({"curve": ["x"]}, "pruning.curve"),
        ({"curve": 0.5}, "pruning.curve"),
        ({"finetune_epochs": -1}, "pruning.finetune_epochs"),
        ({"finetune_epochs": 1.5}, "pruning.finetune_epochs"),
        ({"steps": 0}, "pruning.steps"),
        ({"steps": "two"}, "pruning.steps"),
        ({"finetune_lr": 0}, "pruning.finetune_lr"),
        ({"finetune_lr": "fast"}, "pruning.finetune_lr"),
        ({"include_classifier": "yes"}, "pruning.include_classifier"),
        ({"layers": "conv"}, "pruning.layers"),
    ],
)
def test_validate_rejects_bad_group_values(cfg, key) -> None:
    with pytest.raises(UserError, match="^" + key.replace(".", r"\.")):
        validate_pruning(0.5, cfg)


def test_validate_accepts_and_normalises() -> None:
    cfg = OmegaConf.create(
        {
            "include_classifier": False,
            "finetune_epochs": 2,
            "finetune_lr": None,
            "steps": 3,
            "curve": [0, 0.3, 0.95],
        }
    )
    settings = validate_pruning(0.5, cfg)
    assert settings == PruningSettings(
        amount=0.5,
        include_classifier=False,
        finetune_epochs=2,
        finetune_lr=None,
        steps=3,
        curve=(0.0, 0.3, 0.95),
    )
    assert settings.enabled
    assert settings.resolved_finetune_lr(0.0153) == pytest.approx(0.00153)
    assert validate_pruning(0, {"finetune_lr": 0.01}).resolved_finetune_lr(0.1) == 0.01
    assert not validate_pruning(0, None).enabled


def test_default_yaml_matches_settings() -> None:
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "pruning" / "default.yaml"
    settings = validate_pruning(0.0, OmegaConf.load(conf))
    assert settings == PruningSettings()
