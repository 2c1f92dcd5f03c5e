from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_run.engine.loop import evaluate, train_one_epoch
from cifar_run.models.lenet import LeNet5


def test_training_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    batches = [(x, y)] * 60
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = nn.CrossEntropyLoss()
    before = evaluate(model, [(x, y)], loss, device=torch.device("cpu"))
    stats = train_one_epoch(model, batches, opt, loss, device=torch.device("cpu"))
    after = evaluate(model, [(x, y)], loss, device=torch.device("cpu"))
    assert stats.images == 960 and 0 <= stats.acc <= 100
    assert after.loss < before.loss / 2 and after.acc > before.acc


def test_per_step_scheduler_is_called_every_batch() -> None:
    model = LeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    batch = (torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    train_one_epoch(
        model,
        [batch] * 5,
        opt,
        nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        step_scheduler=lambda: calls.append(1),
    )
    assert len(calls) == 5


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = LeNet5().eval()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    with torch.no_grad():
        mean_logits = (model(x) + model(x.flip(3))) / 2
    expected = nn.CrossEntropyLoss()(mean_logits, y).item()
    cpu = torch.device("cpu")
    flip = evaluate(model, [(x, y)], nn.CrossEntropyLoss(), device=cpu, tta="flip")
    plain = evaluate(model, [(x, y)], nn.CrossEntropyLoss(), device=cpu)
    assert flip.loss == pytest.approx(expected, rel=1e-5)
    assert flip.acc == pytest.approx(100.0 * (mean_logits.argmax(1) == y).float().mean().item())
    assert plain.loss != pytest.approx(flip.loss, rel=1e-5)  # the mirror images did count


def test_unknown_tta_mode_is_refused() -> None:
    batch = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tta='crop'"):
        evaluate(LeNet5(), [batch], nn.CrossEntropyLoss(), device=torch.device("cpu"), tta="crop")


def test_confusion_matrix_counts_each_true_and_predicted_class() -> None:
    torch.manual_seed(0)
    model = LeNet5().eval()
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(3)]
    with torch.no_grad():
        preds = torch.cat([model(x).argmax(1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        expected[t, p] += 1
    stats = evaluate(
        model, batches, nn.CrossEntropyLoss(), device=torch.device("cpu"), num_classes=10
    )
    assert torch.equal(stats.confusion, expected)
    assert stats.acc == pytest.approx(100.0 * expected.trace().item() / 48)
    plain = evaluate(model, batches, nn.CrossEntropyLoss(), device=torch.device("cpu"))
    assert plain.confusion is None and plain.acc == stats.acc


@pytest.mark.parametrize("fp16", [False, True])
def test_grad_clip_bounds_each_step_by_the_clipped_norm(fp16: bool) -> None:
    # Plain SGD at lr 1 moves the parameters by exactly the gradient it is given, so the
    # step's size is the clipped gradient norm (with fp16's scaler: of the unscaled one).
    def step(grad_clip: float | None) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = (10 * torch.randn(8, 3, 32, 32), torch.arange(8))
        train_one_epoch(
            model,
            [batch],
            opt,
            nn.CrossEntropyLoss(),
            device=torch.device("cpu"),
            autocast=torch.float16 if fp16 else None,
            scaler=torch.amp.GradScaler("cpu", init_scale=64.0) if fp16 else None,
            grad_clip=grad_clip,
        )
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    assert step(None) > 2
    assert step(0.5) == pytest.approx(0.5, rel=1e-3)
