"""A plain CNN written as YAML lists: convolution blocks, optional adaptive pooling, FC layers.

One class, :class:`CNN`, covers the custom networks of reference reports 002 (``cnn5``) and 004
(``cnn7``) and any new one a user writes in ``conf/model/NAME.yaml`` or on the command line,
e.g. ``model=cnn model.conv=[32,64,128] model.fc=[256]``.

Schema (every key is optional except ``conv``)::

    conv:                 # one entry per convolution block, in order
      - 32                # an int: that many channels, default kernel/stride/padding
      - {ch: 64, k: 3, stride: 2, pad: 1, pool: 2, bn: true, dropout: 0.2, dropout2d: 0.0}
    kernel: 3             # default kernel size of the convolutions
    pool: null            # default pool after every block (e.g. 2); a block's `pool` overrides
    act: relu             # relu | leaky_relu | gelu | elu | silu | tanh, after every conv/FC
    act_slope: 0.01       # negative slope of leaky_relu
    batchnorm: true       # BatchNorm2d in every conv block (a block's `bn` overrides it)
    bn_after_act: false   # false: Conv-BN-Act; true: Conv-Act-BN (reports 002 and 004)
    pool_type: max        # max | avg: the per-block `pool`
    pool_out: [2, 2]      # adaptive average pool to this size before the FC; null: flatten
    fc: [512, 256]        # hidden FC widths (int or {units: 256, dropout: 0.4});
                          # the final Linear to num_classes is always added
    fc_dropout: 0.0       # Dropout after every hidden FC (an entry's `dropout` overrides it)

A conv block is, in order: Conv2d (padding ``k // 2`` unless ``pad`` is given), then BatchNorm
and the activation in the order ``bn_after_act`` says, then the pooling (``pool: 2`` or
``pool: [3, 2]``, stride = kernel), then ``dropout`` (Dropout) and ``dropout2d`` (Dropout2d).
A max pool runs before a ReLU or LeakyReLU that ends the block's Conv-BN-Act: the same
function and gradients, computed on fewer values.

The spatial size is tracked from the 32x32 input while the layers are built, so an impossible
network (zero channels, a kernel or pool larger than its input) raises :class:`UserError` naming
the layer before any data is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cifar_run.config.values import is_int
from cifar_run.errors import UserError

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "elu", "silu", "tanh")
POOL_TYPES = ("max", "avg")
CONV_KEYS = ("ch", "k", "stride", "pad", "pool", "bn", "dropout", "dropout2d")
FC_KEYS = ("units", "dropout")


def _activation(act: str, slope: float) -> nn.Module:
    if act == "leaky_relu":
        return nn.LeakyReLU(slope, inplace=True)
    return {
        "relu": lambda: nn.ReLU(inplace=True),
        "gelu": nn.GELU,
        "elu": nn.ELU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
    }[act]()


def _bad(where: str, key: str, v: Any) -> str:
    """``model.kernel=0:`` for a top-level key, ``model.conv[2] (conv 3): k=0;`` in a block."""
    return f"model.{key}={v!r}:" if where == "model" else f"{where}: {key}={v!r};"


def _unknown(where: str, keys: Any, allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in set(keys) - set(allowed))
    if unknown:
        hint = " (write `key: value` with a space after the colon)" if ":" in unknown[0] else ""
        raise UserError(f"{where}: unknown key {unknown[0]!r}{hint}; allowed: {', '.join(allowed)}")


def _int(where: str, key: str, v: Any, minimum: int, meaning: str) -> int:
    if not is_int(v) or v < minimum:
        raise UserError(f"{_bad(where, key, v)} {meaning} must be an integer >= {minimum}")
    return v


def _pair(where: str, key: str, v: Any, minimum: int) -> tuple[int, int]:
    """An int or a two-int list, e.g. a pool size 2 or [3, 2]."""
    pair = (v, v) if is_int(v) else v
    if (
        not isinstance(pair, Sequence)
        or isinstance(pair, str)
        or len(pair) != 2
        or not all(is_int(x) and x >= minimum for x in pair)
    ):
        raise UserError(
            f"{_bad(where, key, v)} must be an integer >= {minimum} or a list of two such"
        )
    return int(pair[0]), int(pair[1])


def _prob(where: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise UserError(f"{_bad(where, key, v)} a dropout probability must be in [0, 1)")
    return float(v)


def _size(h: int, w: int) -> str:
    return f"{h}x{w}"


class ConvBlock(nn.Module):
    """One entry of ``conv``: Conv2d, BatchNorm/activation, pooling, dropout."""

    def __init__(self, layers: list[nn.Module], label: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def extra_repr(self) -> str:
        return self.label


class LinearBlock(ConvBlock):
    """One hidden entry of ``fc``: Linear, activation, dropout."""


@dataclass(frozen=True)
class _Defaults:
    """The model-wide settings every conv block starts from (a block's keys override some)."""

    kernel: int
    pool: int | Sequence[int] | None
    act: str
    act_slope: float
    batchnorm: bool
    bn_after_act: bool
    pool_type: str


def _check_options(
    act: Any, pool_type: Any, conv: Any, fc: Any, flags: dict[str, Any], act_slope: Any
) -> None:
    """The model-wide keys that are not numbers (numbers are checked where they are read)."""
    if act not in ACTIVATIONS:
        raise UserError(f"model.act={act!r}: allowed: {', '.join(ACTIVATIONS)}")
    if pool_type not in POOL_TYPES:
        raise UserError(f"model.pool_type={pool_type!r}: allowed: {', '.join(POOL_TYPES)}")
    if isinstance(conv, (str, Mapping)) or not isinstance(conv, Sequence):
        raise UserError(f"model.conv={conv!r}: must be a list of channels or mappings")
    if isinstance(fc, (str, Mapping)) or not isinstance(fc, Sequence):
        raise UserError(f"model.fc={fc!r}: must be a list of widths or mappings")
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise UserError(f"model.{key}={flag!r}: must be true or false")
    if isinstance(act_slope, bool) or not isinstance(act_slope, (int, float)):
        raise UserError(f"model.act_slope={act_slope!r}: must be a number")


def _conv_spec(where: str, item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        _unknown(where, item, CONV_KEYS)
        if "ch" not in item:
            raise UserError(f"{where}: missing 'ch' (the number of output channels)")
        spec = dict(item)
    else:
        spec = {"ch": item}
    ch = spec["ch"]
    if not is_int(ch) or ch < 1:
        raise UserError(f"{where}: {ch!r} channels; channels must be an integer >= 1")
    return spec


def _conv_block(
    i: int, item: Any, channels: int, h: int, w: int, d: _Defaults
) -> tuple[ConvBlock, int, int, int]:
    """Entry `i` of ``conv`` on a `channels` x `h` x `w` input: the block, and its output's
    channels, height and width."""
    where = f"model.conv[{i}] (conv {i + 1})"
    spec = _conv_spec(where, item)
    ch = spec["ch"]
    k = _int(where, "k", spec.get("k", d.kernel), 1, "the kernel size")
    stride = _int(where, "stride", spec.get("stride", 1), 1, "the stride")
    pad = _int(where, "pad", spec.get("pad", k // 2), 0, "the padding")
    if h + 2 * pad < k or w + 2 * pad < k:
        raise UserError(
            f"{where}: input is {_size(h, w)}, a {k}x{k} kernel with padding {pad} "
            "would leave nothing; use a smaller kernel, more padding or fewer "
            "downsampling layers before it"
        )
    h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    use_bn = spec.get("bn", d.batchnorm)
    if not isinstance(use_bn, bool):
        raise UserError(f"{_bad(where, 'bn', use_bn)} must be true or false")
    layers: list[nn.Module] = [nn.Conv2d(channels, ch, k, stride=stride, padding=pad)]
    act_layer = _activation(d.act, d.act_slope)
    norm_act = [act_layer]
    if use_bn:
        norm_act.insert(len(norm_act) if d.bn_after_act else 0, nn.BatchNorm2d(ch))
    layers += norm_act
    label = f"{channels}->{ch}, k{k} s{stride} p{pad}" + ("" if use_bn else ", no BN")
    block_pool = spec.get("pool", d.pool)
    if block_pool is not None:
        ph, pw = _pair(where, "pool", block_pool, 1)
        if ph > h or pw > w:
            raise UserError(
                f"{where}: input is {_size(h, w)}, pooling {ph}x{pw} would leave "
                "nothing; use a smaller pool or fewer downsampling layers before it"
            )
        # A max pool commutes with a ReLU or LeakyReLU just before it (both keep order;
        # same outputs and gradients bit for bit), and the activation then touches a
        # fraction of the values; the indices of the layers with state stay the same.
        swap = d.pool_type == "max" and d.act in ("relu", "leaky_relu") and layers[-1] is act_layer
        pool_cls = nn.MaxPool2d if d.pool_type == "max" else nn.AvgPool2d
        layers.insert(len(layers) - 1 if swap else len(layers), pool_cls((ph, pw)))
        h, w = h // ph, w // pw
        label += f", {d.pool_type}pool {ph}x{pw}"
    for key, cls in (("dropout", nn.Dropout), ("dropout2d", nn.Dropout2d)):
        p = _prob(where, key, spec.get(key, 0.0))
        if p > 0:
            layers.append(cls(p))
            label += f", {key} {p:g}"
    return ConvBlock(layers, label), ch, h, w


def _hidden_layers(
    fc: Sequence[Any], features: int, fc_dropout: float, act: str, act_slope: float
) -> tuple[list[nn.Module], int]:
    """The hidden entries of ``fc`` on `features` inputs: their blocks, and the last width."""
    hidden: list[nn.Module] = []
    for i, item in enumerate(fc):
        where = f"model.fc[{i}] (FC {i + 1})"
        if isinstance(item, Mapping):
            _unknown(where, item, FC_KEYS)
            if "units" not in item:
                raise UserError(f"{where}: missing 'units' (the width of the layer)")
            units, p = item["units"], item.get("dropout", fc_dropout)
        else:
            units, p = item, fc_dropout
        units = _int(where, "units", units, 1, "an FC width")
        p = _prob(where, "dropout", p)
        layers = [nn.Linear(features, units), _activation(act, act_slope)]
        label = f"{features}->{units}"
        if p > 0:
            layers.append(nn.Dropout(p))
            label += f", dropout {p:g}"
        hidden.append(LinearBlock(layers, label))
        features = units
    return hidden, features


class CNN(nn.Module):
    """A plain CNN built from YAML lists; see the module docstring for the schema."""

    def __init__(
        self,
        conv: Sequence[int | Mapping[str, Any]] = (32, 64, 128),
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 32,
        kernel: int = 3,
        pool: int | Sequence[int] | None = None,
        act: str = "relu",
        act_slope: float = 0.01,
        batchnorm: bool = True,
        bn_after_act: bool = False,
        pool_type: str = "max",
        pool_out: int | Sequence[int] | None = (2, 2),
        fc: Sequence[int | Mapping[str, Any]] = (256,),
        fc_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        flags = {"batchnorm": batchnorm, "bn_after_act": bn_after_act}
        _check_options(act, pool_type, conv, fc, flags, act_slope)
        num_classes = _int("model", "num_classes", num_classes, 1, "the class count")
        channels = _int("model", "in_channels", in_channels, 1, "the input channel count")
        kernel = _int("model", "kernel", kernel, 1, "the default kernel size")
        fc_dropout = _prob("model", "fc_dropout", fc_dropout)
        h, w = _pair("model", "input_size", input_size, 1)
        defaults = _Defaults(kernel, pool, act, act_slope, batchnorm, bn_after_act, pool_type)

        blocks: list[nn.Module] = []
        for i, item in enumerate(conv):
            block, channels, h, w = _conv_block(i, item, channels, h, w, defaults)
            blocks.append(block)
        self.features = nn.Sequential(*blocks)

        if pool_out is None:
            self.pool: nn.Module = nn.Identity()
        else:
            h, w = _pair("model", "pool_out", pool_out, 1)
            self.pool = nn.AdaptiveAvgPool2d((h, w))
        hidden, features = _hidden_layers(fc, channels * h * w, fc_dropout, act, act_slope)
        self.classifier = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
