"""Batch halves on two threads (cifar_run.speed.halves): the same gradients as the whole batch,
the same run twice, and only for models where halves are valid."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from cifar_run.engine.loop import train_one_epoch
from cifar_run.engine.precision import resolve_precision
from cifar_run.models import build_model
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run
from cifar_run.speed import setup as accel
from cifar_run.speed import threads as cores
from cifar_run.speed.halves import BatchSplit, suits
from cifar_run.speed.halves_modules import HalvesBatchNorm2d, HalvesDropout2d
from cifar_run.speed.setup import SpeedSettings

from .conftest import TINY, compose_cfg

CPU = torch.device("cpu")


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _named_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _whole_then_halves(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """A step of `model` on the whole batch, then (gradients cleared) one in halves: the
    (loss, outputs, gradients by name) of each."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    whole = (loss.detach(), out.detach(), _named_grads(model))
    model.zero_grad(set_to_none=True)
    split = BatchSplit(2)
    assert split.prepare(model)
    loss2, out2 = split.forward_backward(model, F.cross_entropy, x, y)
    split.close()
    return whole, (loss2, out2, _named_grads(model))


@pytest.mark.parametrize("n", [64, 63, 2, 1])
def test_halves_give_the_loss_outputs_and_gradients_of_the_whole_batch(
    n: int, two_threads: None
) -> None:
    torch.manual_seed(0)
    (loss, out, whole), (loss2, out2, halves) = _whole_then_halves(LeNet5(), *_batch(n))
    assert out2.shape == out.shape and not out2.requires_grad
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(halves.values(), whole.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradients_add_to_what_is_there_as_backward_does(two_threads: None) -> None:
    torch.manual_seed(0)
    model = LeNet5()
    x, y = _batch(16)
    split = BatchSplit(2)
    assert split.prepare(model)
    split.forward_backward(model, F.cross_entropy, x, y)
    once = _grads(model)
    split.forward_backward(model, F.cross_entropy, x, y)
    for a, b in zip(_grads(model), once, strict=True):
        torch.testing.assert_close(a, 2 * b)


def test_halves_run_on_two_threads_with_one_cpu_thread_each(two_threads: None) -> None:
    seen: set[tuple[int, int]] = set()

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.add((threading.get_ident(), torch.get_num_threads()))
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Probe(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 32, 32))  # materialise the lazy layer
    seen.clear()
    split = BatchSplit(2)
    assert split.prepare(model)
    split.forward_backward(model, F.cross_entropy, *_batch(8))
    assert len({ident for ident, _ in seen}) == 2  # the caller and the helper
    assert {threads for _, threads in seen} == {1}
    assert torch.get_num_threads() == 2  # the caller's count comes back


@pytest.mark.parametrize("threads", [3, 4, 5])
def test_each_half_keeps_its_share_of_the_threads(threads: int) -> None:
    # torch gives a thread its process-wide default count when the thread first runs a
    # parallel op, and the caller's settings move that default: with 3 threads the helper
    # ran on 2 instead of 1. Counts only: on a 2-core machine they oversubscribe, no matter.
    seen: dict[str, int] = {}

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[threading.current_thread().name] = torch.get_num_threads()
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Probe(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with cores.cpu_threads(threads):
        split = BatchSplit(threads)
        assert split.prepare(model)
        for _ in range(2):
            split.forward_backward(model, F.cross_entropy, *_batch(8))
        split.close()
        assert torch.get_num_threads() == threads
    helper = next(name for name in seen if name != threading.current_thread().name)
    assert seen[helper] == threads // 2
    assert seen[threading.current_thread().name] == threads - threads // 2


def test_making_a_split_first_thing_leaves_the_callers_thread_count() -> None:
    # In a fresh process the calling thread has not yet taken its count from torch's
    # process-wide default, which the helper's own setting changes.
    code = (
        "import torch; torch.set_num_threads(2); from cifar_run.speed.halves import BatchSplit; "
        "BatchSplit(2); print(torch.get_num_threads())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "2"


def test_helper_takes_autocast_too(two_threads: None) -> None:
    model = LeNet5()
    split = BatchSplit(2)
    assert split.prepare(model)
    _, out = split.forward_backward(model, F.cross_entropy, *_batch(8), autocast=torch.bfloat16)
    assert out.dtype == torch.bfloat16  # both halves: torch.cat would promote a mixed pair
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_an_error_in_the_helper_reaches_the_caller_and_threads_come_back(
    two_threads: None,
) -> None:
    class FailsOnSecondHalf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("boom in the helper")
            return x.flatten(1)[:, :10] * self.w

    split = BatchSplit(2)
    model = FailsOnSecondHalf()
    assert split.prepare(model)
    with pytest.raises(RuntimeError, match="boom in the helper"):
        split.forward_backward(model, F.cross_entropy, *_batch(8))
    assert torch.get_num_threads() == 2


def _train(split: BatchSplit | None, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [_batch(32, seed) for seed in range(steps)]
    stats = train_one_epoch(
        model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU, steps=split
    )
    assert stats.images == 32 * steps
    return [p.detach().clone() for p in model.parameters()]


def test_training_with_halves_repeats_bit_for_bit_and_follows_the_whole_batch(
    two_threads: None,
) -> None:
    first, second = _train(BatchSplit(2)), _train(BatchSplit(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    whole = _train(None)
    for a, b in zip(first, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_halves_suit_models_without_randomness_or_per_call_state() -> None:
    assert suits(LeNet5())
    resnet = build_model(compose_cfg(["model=resnet20"]).model)
    assert suits(resnet)  # its BatchNorms share their statistics between the halves
    assert not suits(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert not suits(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)))
    assert suits(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)))  # a generator per half
    assert not suits(nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.2)))
    assert suits(nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.0)))  # draws nothing
    pruned = LeNet5()
    prune.l1_unstructured(pruned.features[0], "weight", amount=0.5)
    assert suits(pruned)  # its masked weights are taken once per step, before the halves


def _pruned_lenet() -> LeNet5:
    """LeNet-5 with torch's pruning as the pruning stage leaves it: global L1 over every
    weight, pruned twice (a PruningContainer), plus a pruned bias beside a pruned weight."""
    torch.manual_seed(0)
    model = LeNet5()
    weights = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune.global_unstructured(weights, prune.L1Unstructured, amount=0.3)
    prune.global_unstructured(weights, prune.L1Unstructured, amount=0.3)
    prune.l1_unstructured(model.classifier[1], "bias", amount=0.5)
    return model


def test_a_pruned_model_gets_the_whole_batch_gradient_through_its_masks(
    two_threads: None,
) -> None:
    model = _pruned_lenet()
    hooks = {m: list(m._forward_pre_hooks.values()) for m in model.modules()}
    (loss, _, whole), (loss2, _, halves) = _whole_then_halves(model, *_batch(32))
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    assert halves.keys() == whole.keys() and "features.0.weight_orig" in halves
    for name, g in halves.items():
        torch.testing.assert_close(g, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    conv = model.features[0]
    assert torch.all(conv.weight_orig.grad[conv.weight_mask == 0] == 0)
    # torch's hooks are back, in their order, and the weight is a plain leaf again
    assert {m: list(m._forward_pre_hooks.values()) for m in model.modules()} == hooks
    assert conv.weight.grad_fn is None and not conv.weight.requires_grad
    torch.testing.assert_close(conv.weight, conv.weight_orig * conv.weight_mask)


def _train_pruned(split: BatchSplit | None) -> dict[str, torch.Tensor]:
    model = _pruned_lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = [_batch(32, seed) for seed in range(4)]
    train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU, steps=split)
    model.eval()
    with torch.no_grad():
        model(batches[0][0])  # the hooks derive the weights again
    return {
        f"{name}.{kind}": getattr(m, kind).detach().clone()
        for name, m in model.named_modules()
        for kind in ("weight", "bias")
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


def test_fine_tuning_a_pruned_model_in_halves_holds_the_masks_and_repeats(
    two_threads: None,
) -> None:
    first, second = _train_pruned(BatchSplit(2)), _train_pruned(BatchSplit(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    whole = _train_pruned(None)
    for k in first:
        torch.testing.assert_close(first[k], whole[k], rtol=1e-3, atol=1e-5)
        assert torch.equal(first[k] == 0, whole[k] == 0), k  # the same weights stay zero
    weights = [w for k, w in first.items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros >= 0.51 * sum(w.numel() for w in weights)  # 0.3, then 0.3 of the rest
    assert (first["classifier.1.bias"] == 0).float().mean() == 0.5


def test_speed_setup_splits_where_it_suits_and_keeps_small_op_hooks_elsewhere(
    two_threads: None,
) -> None:
    fp32, fp16 = resolve_precision("fp32", CPU), resolve_precision("fp16", CPU)
    assert isinstance(accel.batch_split(LeNet5(), CPU, fp32), BatchSplit)
    assert accel.batch_split(LeNet5(), CPU, fp16) is None  # its grad scaler
    assert accel.batch_split(LeNet5(), CPU, fp32, compile=True) is None
    assert accel.batch_split(LeNet5(), torch.device("cuda"), fp32) is None
    resnet = build_model(compose_cfg(["model=resnet20"]).model)
    assert isinstance(accel.batch_split(resnet, CPU, fp32), BatchSplit)
    bf16 = resolve_precision("bf16", CPU)
    assert isinstance(accel.batch_split(resnet, CPU, bf16), BatchSplit)  # BatchNorm in bf16
    instance = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4))
    assert accel.batch_split(instance, CPU, fp32) is None  # not a norm split.suits takes

    lenet = LeNet5()
    speed = accel.speed_setup(lenet, CPU, "fp32")
    assert speed.split is not None and not lenet._forward_pre_hooks  # no thread hooks
    speed = accel.speed_setup(resnet, CPU, "fp16")
    assert speed.split is None and resnet._forward_pre_hooks  # small ops on one thread
    lenet = LeNet5()
    speed = accel.speed_setup(lenet, CPU, "fp32", settings=SpeedSettings(batch_halves=False))
    assert speed.split is None and lenet._forward_pre_hooks
    torch.set_num_threads(1)
    assert accel.batch_split(LeNet5(), CPU, fp32) is None  # nothing to split across


class _Normed(nn.Module):
    """BatchNorm2d in its variants: momentum None (a cumulative average), no affine
    parameters, no running statistics, and one module called twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=None)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.bn3 = nn.BatchNorm2d(8, track_running_stats=False)
        self.shared = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn3(torch.relu(self.bn2(self.conv2(x))))
        x = self.shared(x) * 0.5 + x
        return self.fc(x.mean((2, 3)))


def _step_both_ways(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None = None
) -> tuple:
    """One step of a copy of `model` on the whole batch and one of another copy in halves:
    (copy, outputs, loss) of each."""
    whole = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = whole(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    halves = copy.deepcopy(model)
    split = BatchSplit(2)
    assert split.prepare(halves)
    loss2, out2 = split.forward_backward(halves, F.cross_entropy, x, y, autocast=autocast)
    return (whole, out.detach(), loss.detach()), (halves, out2, loss2)


@pytest.mark.parametrize("n", [16, 15, 2])
def test_batchnorm_over_halves_is_batchnorm_over_the_batch(n: int, two_threads: None) -> None:
    torch.manual_seed(0)
    model = _Normed().double()
    x = torch.randn(n, 3, 12, 12, dtype=torch.float64) * 2 + 1
    y = torch.randint(0, 10, (n,))
    for _ in range(2):  # the second step meets running statistics the first one moved
        (whole, out, loss), (halves, out2, loss2) = _step_both_ways(model, x, y)
        # In float64 the only difference is the order of a few sums.
        torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss2, loss, rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(whole.named_parameters(), halves.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-12, msg=name)
        for (name, a), b in zip(whole.named_buffers(), halves.buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
        model = whole
    assert int(halves.bn1.num_batches_tracked) == 2  # counted once per step, not per half
    assert int(halves.shared.num_batches_tracked) == 4  # twice per step, as BatchNorm2d does


def test_batchnorm_over_halves_on_channels_last_fp32_batches(two_threads: None) -> None:
    torch.manual_seed(0)
    model = build_model(compose_cfg(["model=cnn"]).model)  # Conv-BN-ReLU blocks
    x, y = _batch(32)
    (whole, out, _), (halves, out2, _) = _step_both_ways(model, x, y)
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(whole.named_parameters(), halves.parameters(), strict=True):
        # Each gradient against its own scale: a conv bias before a BatchNorm has none.
        scale = max(float(a.grad.abs().max()), 1e-3)
        torch.testing.assert_close(b.grad / scale, a.grad / scale, rtol=0, atol=1e-4, msg=name)
    for (name, a), b in zip(whole.named_buffers(), halves.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_batchnorm_over_halves_under_bf16_autocast_takes_its_statistics_in_fp32(
    two_threads: None,
) -> None:
    torch.manual_seed(0)
    model = _Normed()
    with torch.no_grad():  # bn1's input near 50, spread about 0.4: bf16 steps of 0.25
        model.conv1.weight[:, 0] += 50 / 9
    x = torch.randn(16, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    x[:, 0] = 1.0
    y = torch.randint(0, 10, (16,))
    (whole, out, _), (halves, out2, _) = _step_both_ways(model, x, y, torch.bfloat16)
    assert out2.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out2.float(), out.float(), rtol=0.02, atol=0.02)
    # bn1 sees the same bf16 values either way: its statistics match to fp32 rounding (a
    # mean rounded to bf16 would be up to 0.125 off)
    for name in ("running_mean", "running_var"):
        a, b = getattr(whole.bn1, name), getattr(halves.bn1, name)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(whole.named_buffers(), halves.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3, msg=name)  # after bf16 layers
    assert all(p.grad.dtype == torch.float32 for p in halves.parameters())


def test_batchnorm_over_halves_in_bf16_is_as_close_to_fp32_as_the_whole_batch(
    two_threads: None,
) -> None:
    torch.manual_seed(0)
    model = build_model(compose_cfg(["model=cnn"]).model)
    x, y = _batch(32)
    (whole, _, _), (halves, _, _) = _step_both_ways(model, x, y, torch.bfloat16)
    exact = copy.deepcopy(model)
    F.cross_entropy(exact(x), y).backward()

    def error(net: nn.Module) -> float:  # of all gradients together, against fp32's
        pairs = zip(net.parameters(), exact.parameters(), strict=True)
        diff = torch.cat([(a.grad - b.grad).flatten() for a, b in pairs])
        return float(diff.norm() / torch.cat([b.grad.flatten() for b in exact.parameters()]).norm())

    # bf16 is far from fp32 at initialisation (about 10% here); halves no further than whole
    assert error(halves) < 1.25 * error(whole) < 0.5


def test_prepared_batchnorms_keep_their_state_and_behave_as_before_outside_a_step() -> None:
    torch.manual_seed(0)
    model = _Normed()
    before = copy.deepcopy(model)
    BatchSplit(2).prepare(model)
    assert isinstance(model.bn1, HalvesBatchNorm2d) and isinstance(model.bn1, nn.BatchNorm2d)
    assert list(model.state_dict()) == list(before.state_dict())
    x = torch.randn(6, 3, 12, 12)
    torch.testing.assert_close(model(x), before(x), rtol=0, atol=0)  # training, whole batch
    torch.testing.assert_close(model.eval()(x), before.eval()(x), rtol=0, atol=0)


def test_an_error_in_one_half_releases_the_other_waiting_at_a_batchnorm(two_threads: None) -> None:
    class FailsBeforeBatchNorm(_Normed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("boom before the first BatchNorm")
            return super().forward(x)

    model = FailsBeforeBatchNorm()
    split = BatchSplit(2)
    assert split.prepare(model)
    # The calling thread waits at bn1 for a half that never comes: it is released at once
    # and the helper's own error is the one raised.
    with pytest.raises(ValueError, match="boom before the first BatchNorm"):
        split.forward_backward(
            model, F.cross_entropy, torch.randn(8, 3, 12, 12), torch.zeros(8, dtype=torch.long)
        )
    assert torch.get_num_threads() == 2
    loss, _ = split.forward_backward(_prepared(split), F.cross_entropy, *_small_batch())
    assert torch.isfinite(loss)  # the next step runs as usual


def _prepared(split: BatchSplit) -> nn.Module:
    model = _Normed()
    assert split.prepare(model)
    return model


def _small_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))


def test_training_a_batchnorm_net_in_halves_repeats_bit_for_bit(two_threads: None) -> None:
    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(compose_cfg(["model=resnet20"]).model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = [_batch(16, seed) for seed in range(3)]
        split = BatchSplit(2)
        train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU, steps=split)
        return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]

    first, second = train(), train()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_results_say_whether_a_run_trained_in_halves(two_threads: None) -> None:
    assert run(compose_cfg([*TINY, "threads=2"]), None)["batch_halves"] is True
    assert run(compose_cfg([*TINY, "threads=1"]), None)["batch_halves"] is False
    assert run(compose_cfg([*TINY, "threads=2", "precision=bf16"]), None)["batch_halves"] is True
    bf16_bn = [*TINY, "threads=2", "precision=bf16", "model=cnn"]
    assert run(compose_cfg(bf16_bn), None)["batch_halves"] is True  # BatchNorm in bf16 too
    fp16 = [*TINY, "threads=2", "precision=fp16"]
    assert run(compose_cfg(fp16), None)["batch_halves"] is False  # its grad scaler


class _Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.drop2d = nn.Dropout2d(0.5)
        self.fc = nn.Linear(16, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.drop2d(torch.relu(self.conv(x))).mean((2, 3))))


def test_dropout_in_halves_draws_per_half_and_repeats(two_threads: None) -> None:
    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = _Dropping()
        split = BatchSplit(2)
        assert split.prepare(model)
        assert isinstance(model.drop2d, HalvesDropout2d)
        _, out = split.forward_backward(model, F.cross_entropy, *_batch(64))
        return out, [p.grad for p in model.parameters()]

    (out, grads), (out2, grads2) = step(), step()
    assert torch.equal(out, out2)  # the same global seed, the same masks in both halves
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


def test_dropout_masks_in_halves_drop_their_share_and_dropout2d_whole_channels(
    two_threads: None,
) -> None:
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"drop": [], "drop2d": []}
    model = _Dropping()
    for name, seen in calls.items():
        getattr(model, name).register_forward_hook(
            lambda m, args, out, seen=seen: seen.append((args[0].detach(), out.detach()))
        )
    split = BatchSplit(2)
    assert split.prepare(model)
    split.forward_backward(model, F.cross_entropy, *_batch(512))
    assert [len(seen) for seen in calls.values()] == [2, 2]  # one call per half
    for name, seen in calls.items():
        # Kept values are scaled by 1 / (1 - p) = 2, dropped ones are 0.
        factors = [(out / x)[x != 0] for x, out in seen]
        assert set(torch.cat(factors).unique().tolist()) == {0.0, 2.0}, name
        assert 0.4 < torch.cat(factors).eq(0).float().mean() < 0.6, name  # p = 0.5
    # Dropout2d drops whole channels: one factor per (image, channel).
    (x, out), (x2, out2) = calls["drop2d"]
    factor = torch.where(x != 0, out / x, torch.nan).nan_to_num(nan=-1.0).amax((2, 3))
    ratio = torch.where(x != 0, out / x, torch.tensor(9.0)).amin((2, 3))
    assert torch.equal(factor[factor >= 0], ratio[factor >= 0])
    # Each half has its own generator: the two halves' masks differ.
    assert not torch.equal(out.eq(0), out2.eq(0))


def test_halves_draw_from_the_global_generator_only_for_dropout(two_threads: None) -> None:
    for model, draws in ((LeNet5(), False), (_Dropping(), True)):
        split = BatchSplit(2)
        assert split.prepare(model)
        before = torch.get_rng_state()
        split.forward_backward(model, F.cross_entropy, *_batch(8))
        assert torch.equal(torch.get_rng_state(), before) is not draws


def test_an_unprepared_model_is_refused(two_threads: None) -> None:
    with pytest.raises(ValueError, match="prepare"):
        BatchSplit(2).forward_backward(LeNet5(), F.cross_entropy, *_batch(8))


def test_a_run_with_dropout_and_batchnorm_in_halves_repeats(two_threads: None) -> None:
    cfg = [*TINY, "threads=2", "model=cnn7", "epochs=2"]  # report 004's net
    first, second = run(compose_cfg(cfg), None), run(compose_cfg(cfg), None)
    assert first["batch_halves"] is True
    for key in ("test_acc", "test_loss", "best_val_acc", "final_train_acc"):
        assert first[key] == second[key], key
