"""A short, human-readable layer table for ``dry_run=true``.

One row per top-level layer or block, with its output shape for a single input image, its
parameter count and its forward FLOPs per image (torch.utils.flop_counter: 2 per multiply-add,
convolutions and matrix multiplies only). Plain containers (``nn.Sequential``,
``nn.ModuleList``) are opened; blocks with their own ``forward`` (a residual block, a conv
block) stay one row; runs of identical rows (e.g. the 8 repeated blocks of a ResNet-56
stage) are collapsed into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class _Row:
    name: str
    what: str
    shape: str
    params: int
    flops: int
    count: int = 1
    last: str = ""


def _pairs(v: int | Sequence[int]) -> str:
    if isinstance(v, int):
        return str(v)
    return str(v[0]) if len(set(v)) == 1 else "x".join(str(x) for x in v)


def _describe(module: nn.Module) -> str:
    """The type name plus the few settings that tell two layers of that type apart."""
    kind = type(module).__name__
    label = getattr(module, "label", None)
    if isinstance(label, str):
        return f"{kind} {label}"
    if isinstance(module, nn.Conv2d):
        return (
            f"{kind} {module.in_channels}->{module.out_channels} "
            f"k{_pairs(module.kernel_size)} s{_pairs(module.stride)}"
        )
    if isinstance(module, nn.Linear):
        return f"{kind} {module.in_features}->{module.out_features}"
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return f"{kind} {module.num_features}"
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        return f"{kind} k{_pairs(module.kernel_size)} s{_pairs(module.stride)}"
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return f"{kind} {_pairs(module.output_size)}"
    if isinstance(module, nn.Dropout | nn.Dropout2d):
        return f"{kind} {module.p:g}"
    return kind


def _rows(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to show: open plain containers, skip parameter-free Identity."""
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child) in CONTAINERS:
                walk(child, f"{full}.")
            elif not isinstance(child, nn.Identity):
                out.append((full, child))

    walk(model, "")
    if not out:  # a model that is a single layer
        out.append((type(model).__name__, model))
    return out


def _shape(output: object) -> str:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, torch.Tensor):
        return "x".join(str(d) for d in output.shape[1:]) or "1"
    return "-"


def _si(n: float) -> str:
    """1303440 -> 1.30M: three significant digits, SI prefix."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.3g}{prefix}"
    return f"{n:g}"


def _group_name(first: str, last: str) -> str:
    head, _, a = first.rpartition(".")
    head2, _, b = last.rpartition(".")
    if head == head2 and a.isdigit() and b.isdigit():
        return f"{first}-{b}"
    return f"{first}..{last}"


def _trace(
    model: nn.Module, layers: list[tuple[str, nn.Module]], input_shape: Sequence[int]
) -> tuple[dict[str, str], FlopCounterMode, object]:
    """The forward pass of `layer_summary`: each layer's output shape, the FLOP counter and
    the model's output."""
    shapes: dict[str, str] = {}
    hooks = []
    for name, module in layers:

        def hook(_m: nn.Module, _i: object, output: object, name: str = name) -> None:
            shapes[name] = _shape(output)

        hooks.append(module.register_forward_hook(hook))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            output = model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes, counter, output


def _table(rows: list[_Row], max_lines: int) -> list[str]:
    """The rows as aligned text lines (a collapsed run of rows with its count); at most
    `max_lines` - 1 lines, the last saying how many rows were left out."""
    table = [("layer", "type", "output", "params", "FLOPs")]
    for r in rows:
        if r.count == 1:
            table.append((r.name, r.what, r.shape, f"{r.params:,}", _si(r.flops)))
        else:
            table.append(
                (
                    _group_name(r.name, r.last),
                    f"{r.what} x{r.count}",
                    r.shape,
                    f"{r.count}x{r.params:,}",
                    f"{r.count}x{_si(r.flops)}",
                )
            )
    hidden = 0
    if len(table) > max_lines - 1:
        hidden = len(table) - (max_lines - 2)
        table = table[: max_lines - 2]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}  "
        f"{e:>{widths[4]}}".rstrip()
        for a, b, c, d, e in table
    ]
    if hidden:
        lines.append(f"... {hidden} more rows")
    return lines


def layer_summary(
    model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32), max_lines: int = 30
) -> str:
    """A table of the model's layers with output shapes and FLOPs for a ``input_shape`` input.

    Runs one forward pass without gradients in eval mode (the model's mode is restored) on
    the device of the model's parameters. At most ``max_lines`` lines.
    """
    layers = _rows(model)
    shapes, counter, output = _trace(model, layers, input_shape)

    # FlopCounterMode names modules by the root's class name, then their path.
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    rows: list[_Row] = []
    for name, module in layers:
        row = _Row(
            name,
            _describe(module),
            shapes.get(name, "-"),
            sum(p.numel() for p in module.parameters()),
            flops.get(f"{root}.{name}", 0) if name != root else counter.get_total_flops(),
        )
        prev = rows[-1] if rows else None
        if prev and (prev.what, prev.shape, prev.params) == (row.what, row.shape, row.params):
            prev.count += 1
            prev.last = name
        else:
            rows.append(row)

    lines = _table(rows, max_lines)
    total = sum(p.numel() for p in model.parameters())
    size = "x".join(str(d) for d in input_shape[1:])
    lines.append(
        f"input {size} -> output {_shape(output)}; {total:,} parameters; "
        f"{_si(counter.get_total_flops())} FLOPs forward per image"
    )
    return "\n".join(lines)
