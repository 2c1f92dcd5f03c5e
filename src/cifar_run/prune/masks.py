"""Global L1 magnitude pruning (as report 000 prunes): pure functions on ``nn.Module``.

The masks come from ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``:
the weights with the smallest absolute value across *all* selected Conv2d/Linear weights are
zeroed (one global threshold, not one per layer).

No Hydra here and no file I/O; the run wires these into its train/eval loop.

Why a pruned weight stays exactly 0 during fine-tuning
------------------------------------------------------
``torch.nn.utils.prune`` renames ``weight`` to the parameter ``weight_orig``, adds a buffer
``weight_mask`` and a forward pre-hook that sets ``weight = weight_orig * weight_mask`` before
every forward pass. The optimizer only ever sees ``weight_orig``. Its gradient is
``grad(weight) * mask``, i.e. 0 at pruned positions, but weight decay (``wd * weight_orig``)
and the momentum buffer still move ``weight_orig`` there: the *stored* pruned values drift.
That does not matter: the effective weight is recomputed from the unchanged 0/1 mask, and
``x * 0.0 == 0`` for every finite ``x`` (SGD with weight decay only shrinks those entries,
so they stay finite). ``make_permanent`` then bakes ``weight_orig * mask`` into a plain
``weight``, so the saved checkpoint has exact zeros. Code that reads weights while the masks
are attached must use :func:`effective_weight`, not ``module.weight``, which is only
refreshed at the next forward pass and is stale right after an optimizer step.
"""

from __future__ import annotations

import copy
import gzip
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from cifar_run.errors import UserError

ParamList = list[tuple[nn.Module, str]]

__all__ = [
    "apply_global_l1",
    "checkpoint_sizes",
    "effective_weight",
    "fully_pruned_layers",
    "global_sparsity",
    "make_permanent",
    "prunable_parameters",
    "prune_copy",
    "sparsity_table",
    "step_targets",
    "target_count",
]

# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def prunable_parameters(model: nn.Module, include_classifier: bool = True) -> ParamList:
    """Every Conv2d and Linear ``weight`` of ``model``, in module order (report 000).

    With ``include_classifier=False`` the last Linear layer in module order (the final
    classifier for every model in ``conf/model``) is left out and stays dense. Biases,
    BatchNorm tensors and anything else are never selected.

    Raises UserError if nothing is selected.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not include_classifier:
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        if linears:
            last = linears[-1]
            layers = [m for m in layers if m is not last]
    if not layers:
        raise UserError(
            "pruning.include_classifier: selects no Conv2d/Linear weight "
            f"(model {type(model).__name__}, pruning.include_classifier={include_classifier})"
        )
    return [(m, "weight") for m in layers]


def effective_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight a forward pass uses now: ``orig * mask`` while pruning masks are attached."""
    mask = getattr(module, name + "_mask", None)
    if mask is None:
        return getattr(module, name).detach()
    return (getattr(module, name + "_orig") * mask).detach()


def detach_masked_weights(params: ParamList) -> None:
    """Recompute each masked ``weight`` attribute (``orig * mask``) outside autograd.

    The attribute torch's pruning derives with autograd is not a graph leaf, and
    ``copy.deepcopy`` (e.g. a weight average's copy of the model) refuses non-leaf tensors;
    the next forward pass derives it with autograd again."""
    with torch.no_grad():
        for module, name in params:
            if getattr(module, name + "_mask", None) is not None:
                setattr(module, name, effective_weight(module, name))


def _masked_count(params: ParamList) -> int:
    """Weights already removed by an attached mask (0 for unpruned parameters)."""
    total = 0
    for module, name in params:
        mask = getattr(module, name + "_mask", None)
        if mask is not None:
            total += int((mask == 0).sum())
    return total


# ---------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------


def target_count(amount: float, total: int) -> int:
    """Number of weights pruned for fraction ``amount`` of ``total``: ``round(amount*total)``.

    This is exactly how torch converts a float amount (``prune._compute_nparams_toprune``
    uses Python's ``round``, so an exact .5 goes to the even neighbour).
    """
    return round(amount * total)


def apply_global_l1(params: ParamList, amount: float) -> None:
    """Prune in place until exactly ``round(amount * P)`` of the ``P`` weights are masked.

    ``amount`` is the *overall* fraction of all selected weights, counting weights masked by
    earlier calls: calling this with 0.25 and then 0.5 leaves 50% pruned, not 62.5%. torch's
    own ``amount`` is relative to the still-unpruned weights, so this passes it the absolute
    number still to remove (an int), which is the fraction
    ``(amount - already) / (1 - already)`` of the unpruned weights without its rounding.

    Importance scores are the effective weights (``orig * mask``, recomputed here, not the
    possibly stale ``module.weight``); already-pruned weights are never revived.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount!r}")
    total = sum(getattr(m, n).numel() for m, n in params)
    already = _masked_count(params)
    extra = target_count(amount, total) - already
    if extra < 0:
        raise ValueError(
            f"amount {amount} asks for {already + extra} pruned weights, "
            f"but {already} are already pruned (pruning cannot be undone)"
        )
    scores = {(m, n): effective_weight(m, n) for m, n in params}
    torch_prune.global_unstructured(
        params,
        pruning_method=torch_prune.L1Unstructured,
        importance_scores=scores,
        amount=int(extra),
    )


def attach_masks(params: ParamList) -> None:
    """Give every parameter without one a mask of ones (``prune.identity``): the
    ``*_orig``/``*_mask`` layout of a pruned model, so that its state dict can be loaded
    (resuming a pruning stage). Later pruning combines with these masks as with any other."""
    for module, name in params:
        if getattr(module, name + "_mask", None) is None:
            torch_prune.identity(module, name)


def step_targets(amount: float, steps: int) -> list[float]:
    """Cumulative targets of iterative pruning: ``amount * k / steps`` for k = 1..steps.

    Each step removes the same share of the *overall* weight count; the last equals
    ``amount`` exactly.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [amount * k / steps for k in range(1, steps)] + [amount]


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every pruning reparametrisation in place (``prune.remove``); returns ``model``.

    Afterwards ``weight`` is a plain parameter holding ``orig * mask`` (exact zeros), and the
    state dict has no ``*_orig``/``*_mask`` keys, so it loads strictly into a fresh model.
    """
    for module in model.modules():
        names = [
            hook._tensor_name
            for hook in list(module._forward_pre_hooks.values())
            if isinstance(hook, torch_prune.BasePruningMethod)
        ]
        for name in names:
            torch_prune.remove(module, name)
    return model


def prune_copy(model: nn.Module, amount: float, include_classifier: bool = True) -> nn.Module:
    """A pruned (and permanent) deep copy of a dense ``model``; ``model`` is left untouched.

    For ``pruning.curve``: several amounts evaluated from the same trained weights.
    ``model`` must not carry pruning masks (deep-copying their derived ``weight`` fails).
    """
    if torch_prune.is_pruned(model):
        raise ValueError("prune_copy needs a dense model; call make_permanent first")
    pruned = copy.deepcopy(model)
    apply_global_l1(prunable_parameters(pruned, include_classifier), amount)
    return make_permanent(pruned)


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def sparsity_table(model: nn.Module, params: ParamList) -> list[dict[str, Any]]:
    """One row per prunable weight: name, shape, weights, zeros, sparsity.

    ``zeros`` counts exact zeros of the effective weight (masked or baked-in, and any
    weight that happens to be 0), i.e. what the saved checkpoint will contain.
    """
    names = {id(m): prefix for prefix, m in model.named_modules()}
    rows = []
    for module, pname in params:
        w = effective_weight(module, pname)
        prefix = names.get(id(module))
        if prefix is None:
            raise ValueError(f"parameter {pname} of {type(module).__name__} is not in the model")
        weights = w.numel()
        zeros = int((w == 0).sum())
        rows.append(
            {
                "name": f"{prefix}.{pname}" if prefix else pname,
                "shape": "x".join(str(s) for s in w.shape),
                "weights": weights,
                "zeros": zeros,
                "sparsity": zeros / weights if weights else 0.0,
            }
        )
    return rows


def global_sparsity(rows: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of all prunable weights that are zero, from :func:`sparsity_table` rows."""
    weights = sum(r["weights"] for r in rows)
    return sum(r["zeros"] for r in rows) / weights if weights else 0.0


def fully_pruned_layers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of layers whose weight is 100% zero (the layer then passes only its bias)."""
    return [r["name"] for r in rows if r["weights"] and r["zeros"] == r["weights"]]


def checkpoint_sizes(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """Size of ``torch.save(state_dict)`` in bytes, raw and gzip-compressed (level 6).

    Unstructured sparsity does not shrink the raw file (zeros are still stored as float32);
    the gzip size shows what the zeros buy when the file is compressed.
    """
    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)
    raw = buf.getvalue()
    return {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, compresslevel=6, mtime=0))}
