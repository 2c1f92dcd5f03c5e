"""The per-step update of `ema`'s weight average: torch's own against cifar-run's.

For each model (cifar-run `model` options), the script builds the model and two averages of
it (`cifar_run.engine.ema.weight_average`), then times --calls updates of each per round, torch's
`AveragedModel.update_parameters(model)` and `cifar_run.engine.ema.step_function`, alternating
which goes first, for --rounds rounds. Between rounds the model's tensors move (random
noise), so every update has work to do. It prints the median ms per update of both, the
median of the per-round ratios, and whether the two averages came out identical (they
must: the same arithmetic, the tensors paired once instead of per step). On CUDA each
round ends with a synchronisation, so the times include the kernels.

Example (the figures in docs/benchmarks.md, "Weight average update"):
    PYTHONPATH=src python scripts/bench_ema.py --models lenet5 resnet18 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402

from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.engine.ema import step_function, weight_average  # noqa: E402
from cifar_run.models import build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet18"])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=50, help="updates per round and arm")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def _time(update: Callable[[], None], calls: int, device: torch.device) -> float:
    """ms per call."""
    start = time.perf_counter()
    for _ in range(calls):
        update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model(compose_config([f"model={name}"]).model).to(device)
    theirs, ours = weight_average(model, args.decay), weight_average(model, args.decay)
    arms = {
        "AveragedModel.update_parameters": lambda: theirs.update_parameters(model),
        "ema.step_function": step_function(ours, model),
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for arm in order:
            times[arm].append(_time(arms[arm], args.calls, device))
    old, new = (statistics.median(t) for t in times.values())
    ratio = statistics.median(a / b for a, b in zip(*times.values(), strict=True))
    mine, expected = ours.state_dict(), theirs.state_dict()
    same = all(torch.equal(mine[k], expected[k]) for k in expected)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{name} ({params:,} parameters, {device}): AveragedModel.update_parameters "
        f"{old:.3f} ms, ema.step_function {new:.3f} ms per update (medians of "
        f"{args.rounds} rounds); {ratio:.2f}x per round; identical averages: {same}"
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, decay {args.decay}")
    for name in args.models:
        bench(name, args, device)


if __name__ == "__main__":
    main()
