"""The sparsity curve (`pruning.curve`): accuracy at several amounts, each from a pruned
copy of the dense model, without retraining; and the counts every pruning table uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from cifar_run.engine.loop import LoopData
from cifar_run.prune.masks import (
    fully_pruned_layers,
    global_sparsity,
    prunable_parameters,
    prune_copy,
    sparsity_table,
)
from cifar_run.prune.settings import PruningSettings

log = logging.getLogger(__name__)

CURVE_COLUMNS = (
    "amount",
    "sparsity",
    "nonzero_params",
    "val_acc",
    "test_acc",
    "fully_pruned_layers",
)


def counts(model: nn.Module, params: list[tuple[nn.Module, str]], total_params: int) -> dict:
    rows = sparsity_table(model, params)
    zeros = sum(r["zeros"] for r in rows)
    nonzero = total_params - zeros
    return {
        "rows": rows,
        "sparsity": global_sparsity(rows),
        "zeros": zeros,
        "nonzero_params": nonzero,
        "compression": total_params / nonzero if nonzero else math.inf,
    }


def warn_fully_pruned(layers: Sequence[str], what: str) -> None:
    if layers:
        log.warning(
            "%s: layer(s) %s are 100%% pruned (every weight is zero; they pass only their "
            "bias); lower the amount or set pruning.include_classifier=false",
            what,
            ", ".join(layers),
        )


def run_curve(
    model: nn.Module,
    settings: PruningSettings,
    data: LoopData,
    *,
    total_params: int,
    dense_val_acc: float,
    dense_test_acc: float,
) -> list[dict[str, Any]]:
    """Accuracy at each `pruning.curve` amount, from pruned copies of the dense `model`.

    The dense model itself is the amount-0 point (its accuracies are the run's own).
    """
    rows = []
    for amount in sorted(set(settings.curve) | {0.0}):
        if amount == 0.0:
            pruned, val_acc, test_acc = model, dense_val_acc, dense_test_acc
        else:
            pruned = prune_copy(model, amount, settings.include_classifier)
            val_acc = data.evaluate(pruned, data.val).acc
            test_acc = data.evaluate(pruned, data.test).acc
        tally = counts(
            pruned, prunable_parameters(pruned, settings.include_classifier), total_params
        )
        full = fully_pruned_layers(tally["rows"])
        warn_fully_pruned(full, f"pruning.curve amount {amount:g}")
        log.info(
            "curve: amount %g  sparsity %.4f  val acc %.2f  test acc %.2f",
            amount,
            tally["sparsity"],
            val_acc,
            test_acc,
        )
        rows.append(
            {
                "amount": amount,
                "sparsity": tally["sparsity"],
                "nonzero_params": tally["nonzero_params"],
                "val_acc": val_acc,
                "test_acc": test_acc,
                "fully_pruned_layers": ";".join(full),
            }
        )
    return rows
