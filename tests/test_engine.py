from __future__ import annotations

import torch
from torch import nn

from cifar_run.engine import evaluate, train_one_epoch
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
