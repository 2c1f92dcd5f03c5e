"""Training steps of one model two ways, in interleaved rounds: NCHW against channels_last
batches (--compare format, the default), fp32 against bf16 autocast (--compare precision),
optimizer steps on every CPU thread against one (--compare step-threads), the textbook
conv, activation, max pool against the pool first (--compare pool-order), or every op on
every thread against small ops on one (--compare op-threads), or the whole batch against
halves of it on two threads (--compare batch-split), or small linear layers under bf16
autocast against the same in fp32 (--compare linear-precision, in halves where cifar-run
splits batches).

For a config given as cifar-run overrides, the script builds the model twice (same seed,
same weights) with cifar-run's speed settings (precision, conv_grad's convolutions on the
CPU), and trains each on fixed random batches of `batch_size` for --steps steps per round,
alternating which goes first, for --rounds rounds. It prints the median ms per step (wall
and CPU time) of each arm and the median of the per-round speed ratios, second arm / first:
the measurements behind `accel.memory_format` (channels_last / NCHW, in the config's
precision), `precision=auto` on the CPU (bf16 / fp32, in the memory format cifar-run picks),
`cores.one_thread_steps` (one thread / every thread for the optimizer's steps) and the
pool-first order of LeNet-5 and `model=cnn` (pool-act / act-pool; the script builds the
act-pool arm by moving each max pool back behind the ReLU it precedes) and
`cores.small_ops_on_one_thread` (small-ops-one / ops-every-thread) and `accel.batch_split`
(halves / whole-batch) and `accel.fp32_small_linears` (fp32-linears / bf16-linears).
Apart from what is compared, both arms train as cifar-run does, except that only the
halves arm splits batches (and both arms of --compare linear-precision). With --prune
AMOUNT both arms train the model pruned as the pruning stage leaves it (global L1 over its
Conv2d and Linear weights, torch's masks attached), as its fine-tuning does.

OpenMP's waiting policy is read once per process, so compare it by running the script in
separate processes, e.g. `GOMP_SPINCOUNT=300000 python scripts/bench_step.py ...` against
the default (passive waits, as cifar-run sets them).

Example (the figures in docs/benchmarks.md, "Memory format of LeNet-5"):
    PYTHONPATH=src python scripts/bench_step.py model=lenet5 batch_size=64 --rounds 30
    PYTHONPATH=src python scripts/bench_step.py model=lenet5 precision=fp32 --rounds 30
    PYTHONPATH=src python scripts/bench_step.py model=resnet18 batch_size=128 \
        --compare precision --rounds 4 --steps 5
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare step-threads
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare pool-order
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare op-threads
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare batch-split
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare batch-split \
        --prune 0.5
    PYTHONPATH=src python scripts/bench_step.py experiment=report000 --compare linear-precision
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cifar_run import accel, cores  # noqa: E402
from cifar_run.cli import compose_config  # noqa: E402
from cifar_run.models import build_model  # noqa: E402
from cifar_run.optim import build_optimizer  # noqa: E402
from cifar_run.pruning import apply_global_l1, prunable_parameters  # noqa: E402
from cifar_run.run import seed_everything  # noqa: E402

CPU = torch.device("cpu")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PRECISIONS = ("fp32", "bf16")
STEP_THREADS = ("every-thread", "one-thread")
POOL_ORDERS = ("act-pool", "pool-act")
OP_THREADS = ("ops-every-thread", "small-ops-one")
BATCH_SPLIT = ("whole-batch", "halves")
LINEARS = ("bf16-linears", "fp32-linears")
HALF_HELPERS = ("helper-thread", "helper-process")
POOLS = ("bf16-pools", "fp32-pools")
COMPARED = {
    "format": FORMATS,
    "precision": PRECISIONS,
    "step-threads": STEP_THREADS,
    "pool-order": POOL_ORDERS,
    "half-helper": HALF_HELPERS,
    "op-threads": OP_THREADS,
    "batch-split": BATCH_SPLIT,
    "linear-precision": LINEARS,
    "pool-precision": POOLS,
}  # --compare: the two arms of each


def textbook_order(model: nn.Module) -> int:
    """Move every max pool that comes straight before a ReLU or LeakyReLU back behind it, in
    place; returns how many moved."""
    moved = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.MaxPool2d) and isinstance(seq[i + 1], nn.ReLU | nn.LeakyReLU):
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
                moved += 1
    return moved


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run overrides, e.g. model=lenet5")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each round")
    parser.add_argument(
        "--compare",
        choices=list(COMPARED),
        default="format",
        help="NCHW vs channels_last batches (default), fp32 vs bf16 autocast, optimizer "
        "steps on every thread vs one, activation before max pool vs after, or every op "
        "on every thread vs small ops on one, whole batches vs halves on two threads, or "
        "small linear layers in bf16 vs fp32 under autocast",
    )
    parser.add_argument(
        "--prune",
        type=float,
        default=0.0,
        metavar="AMOUNT",
        help="train the model pruned by this fraction (global L1, masks attached), as the "
        "pruning stage's fine-tuning does (default 0: dense)",
    )
    args = parser.parse_args()
    if not 0.0 <= args.prune < 1.0:
        parser.error(f"--prune {args.prune}: the fraction of weights pruned, in [0, 1)")
    return args


def main() -> None:
    args = parse_args()
    cfg = compose_config(["device=cpu", *args.overrides])
    threads = cores.set_threads(cfg.get("threads"))
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(8, cfg.batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (8, cfg.batch_size), generator=generator)

    arms = {}
    for name in COMPARED[args.compare]:
        seed_everything(cfg.seed)
        model = build_model(cfg.model)
        if name == "act-pool" and not textbook_order(model):
            raise SystemExit(f"bench_step.py: model={cfg.model.name} has no pool before a ReLU")
        precision = name if name in PRECISIONS else cfg.precision
        speed = accel.speed_setup(
            model,
            CPU,
            precision,
            op_threads=name != "ops-every-thread",
            split=name in ("halves", *LINEARS, *HALF_HELPERS, *POOLS),
            fp32_linears=name != "bf16-linears",
            process_halves=name in ("helper-process", *LINEARS, *POOLS),
            fp32_pools=name != "bf16-pools",
        )
        if args.prune:  # after speed_setup, as in a run: the pruning stage comes last
            apply_global_l1(prunable_parameters(model), args.prune)
        if name == "halves" and not (speed.split and speed.split.prepare(model)):
            raise SystemExit(f"bench_step.py: model={cfg.model.name} does not suit batch halves")
        if (
            name in (*LINEARS, *HALF_HELPERS, *POOLS)
            and speed.split
            and not speed.split.prepare(model)
        ):
            if name in HALF_HELPERS:
                raise SystemExit(f"bench_step.py: model={cfg.model.name} does not suit halves")
            speed = dataclasses.replace(speed, split=None)
        optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
        if name != "every-thread":
            cores.one_thread_steps(optimizer, CPU)
        fmt = FORMATS.get(name, speed.memory_format)
        batches = [x.contiguous(memory_format=fmt) for x in images]
        arms[name] = (speed, optimizer, batches)

    def steps(name: str, count: int) -> None:
        speed, optimizer, batches = arms[name]
        dtype = speed.precision.dtype
        torch.set_num_threads(threads)  # the other arm's last op may have left one
        for i in range(count):
            optimizer.zero_grad(set_to_none=True)
            if speed.split is not None:
                speed.split.forward_backward(
                    speed.net, F.cross_entropy, batches[i % 8], labels[i % 8], autocast=dtype
                )
            else:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(speed.net(batches[i % 8]), labels[i % 8])
                loss.backward()
            optimizer.step()

    for name, (speed, _, _) in arms.items():  # a helper process starts after some steps
        deadline = time.monotonic() + 120
        while speed.split is not None and speed.split.wants_process and not speed.split.in_process:
            if time.monotonic() > deadline:
                raise SystemExit("bench_step.py: the helper process did not take the model")
            steps(name, 50)
    print(
        f"config: model={cfg.model.name} batch_size={cfg.batch_size} prune={args.prune} "
        f"precision={', '.join(speed.precision.name for speed, _, _ in arms.values())}, "
        f"{threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
    )
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            steps(name, args.warmup)
            t, c = time.perf_counter(), time.process_time()
            steps(name, args.steps)
            wall[name].append(1e3 * (time.perf_counter() - t) / args.steps)
            cpu[name].append(1e3 * (time.process_time() - c) / args.steps)
    for name in names:
        print(
            f"{name:14s} ms per step: wall {statistics.median(wall[name]):.3f}, "
            f"CPU {statistics.median(cpu[name]):.3f} (medians of {args.rounds} rounds)"
        )
    first, second = names
    ratios = [a / b for a, b in zip(wall[first], wall[second], strict=True)]
    print(f"{second} speed / {first}: median {statistics.median(ratios):.3f}x per round")


if __name__ == "__main__":
    main()
