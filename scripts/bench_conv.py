"""What cifar_run.speed.conv_grad buys: convolutions on small maps as matrix multiplies, on the CPU.

Two measurements, both in one process with the two variants interleaved:

  layers  single convolution layers at batch --batch (bf16, channels_last), median of
          --repeats calls each: oneDNN's forward, input gradient, weight gradient and both
          gradients together, against the weight gradient by taps (`tap_weight_grad`) and
          the im2col matmul convolution (`_GemmConv`: forward, and both gradients).
  step    whole training steps of a model (SGD, bf16 autocast, random channels_last batches):
          one copy with plain nn.Conv2d layers and one after `use_tap_weight_grads`,
          alternating step by step; median step time of each after 2 warm-up steps.

Example (the figures in docs/benchmarks.md):

    python scripts/bench_conv.py --model resnet18 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cifar_run.models import build_model
from cifar_run.speed.conv_grad import _GemmConv, tap_weight_grad, use_tap_weight_grads

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# (in, out, map size, kernel, stride): ResNet-18's layers on 16x16 maps and smaller.
LAYERS = [
    (128, 128, 16, 3, 1),
    (128, 256, 16, 3, 2),
    (256, 256, 8, 3, 1),
    (256, 512, 8, 3, 2),
    (512, 512, 4, 3, 1),
    (64, 64, 8, 3, 1),
    (256, 512, 8, 1, 2),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_layer(
    cin: int, cout: int, size: int, k: int, stride: int, batch: int, repeats: int
) -> str:
    """One table row: every timing of one convolution layer, in ms."""
    pad = k // 2
    x = torch.randn(batch, cin, size, size, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, dtype=torch.bfloat16)
    s, p = (stride, stride), (pad, pad)
    g = torch.randn_like(F.conv2d(x, w, None, s, p))
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

    def onednn(mask: list[bool]) -> Callable[[], object]:
        args = (g, x, w, None, list(s), list(p), [1, 1], False, [0, 0], 1, mask)
        return lambda: torch.ops.aten.convolution_backward(*args)

    out = _GemmConv.apply(xg, wg, s, p)  # one forward; its backward is timed again and again

    fwd = median_ms(lambda: F.conv2d(x, w, None, s, p), repeats)
    gemm_fwd = median_ms(lambda: _GemmConv.apply(x, w, s, p), repeats)
    gin = median_ms(onednn([True, False, False]), repeats)
    gw = median_ms(onednn([False, True, False]), repeats)
    both = median_ms(onednn([True, True, False]), repeats)
    taps = median_ms(lambda: tap_weight_grad(g, x, (k, k), s, p), repeats)
    gemm_bwd = median_ms(lambda: torch.autograd.grad(out, (xg, wg), g, retain_graph=True), repeats)
    name = f"{cin}->{cout} {size}x{size} k{k} s{stride}"
    return (
        f"  {name:24s} {fwd:6.1f} {gemm_fwd:8.1f} {gin:8.1f} {gw:7.1f} {taps:6.1f}"
        f" {both:9.1f} {gemm_bwd:9.1f}"
    )


def bench_layers(batch: int, repeats: int) -> None:
    print(f"layers (batch {batch}, bf16, channels_last), median of {repeats}, ms:")
    print("  layer                      fwd gemm-fwd  in-grad  w-grad   taps  in+w-grad gemm-bwd")
    for layer in LAYERS:
        print(bench_layer(*layer, batch=batch, repeats=repeats), flush=True)


def bench_step(model: str, batch: int, steps: int) -> None:
    torch.manual_seed(0)
    plain = build_model(OmegaConf.load(CONF / f"{model}.yaml"))
    fast = copy.deepcopy(plain)
    changed = use_tap_weight_grads(fast)
    arms = {"oneDNN convolutions": plain, "conv_grad": fast}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        for name, net in arms.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(net(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    print(f"step ({model}, batch {batch}, bf16, {changed} convolutions swapped), {steps} steps:")
    base = statistics.median(times["oneDNN convolutions"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:20s} median {1e3 * med:7.0f} ms = {batch / med:6.1f} images/s"
            f"  ({base / med:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", help="a conf/model entry")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--repeats", type=int, default=5, help="calls per layer timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_layers:
        bench_layers(args.batch, args.repeats)
    bench_step(args.model, args.batch, args.steps)


if __name__ == "__main__":
    main()
