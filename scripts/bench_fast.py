"""experiment=fast timed the way airbench times itself: the mean test accuracy over --runs
runs, and the seconds each run spends training plus its final evaluation.

Each run is `cifar_run.run.run(cfg, out_dir=None)` (no files written) with seed --seed + i;
its results give `train_seconds` (every epoch, from the first batch to the last) and
`test_seconds` (the final test pass, flip TTA included). Both are perf_counter intervals that
end in a host synchronisation (the epoch's loss and the test accuracy are read with .item()),
so on CUDA they include all the GPU work queued inside them: CUDA-synchronised. Loading the
data and copying it to the GPU come before the first epoch and are not timed, as in airbench.
A warm-up run of --warmup epochs (not reported) first lets cuDNN choose its kernels for each
shape (torch.backends.cudnn.benchmark) and, with compile=true, compiles the model.

Overrides are cifar-run's, after experiment=fast, e.g. epochs=16 or data=imagefolder
data.root=../shared/data/cifar10-jpeg. Examples:

    python scripts/bench_fast.py --runs 5
    python scripts/bench_fast.py --runs 5 epochs=18 data=imagefolder data.root=PATH
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.errors import UserError  # noqa: E402
from cifar_run.run import resolve_device, run  # noqa: E402

TARGET = 94.0  # percent: airbench94's and Page's mark


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run overrides after experiment=fast")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="epochs of an untimed warm-up run first (default 1; 0 = none)",
    )
    return parser.parse_args()


def compose_cfg(overrides: list[str]) -> DictConfig:
    cfg = compose_config(["experiment=fast", *overrides])
    with open_dict(cfg):
        cfg.prune = 0.0  # the record is for training and testing; no pruning stage
    return cfg


@dataclass
class Timed:
    seed: int
    test_acc: float
    train_seconds: float
    test_seconds: float

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.test_seconds


def timed_run(cfg: DictConfig, seed: int, epochs: int | None = None) -> Timed:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.seed = seed
        if epochs is not None:
            cfg.epochs = epochs
    results = run(cfg, out_dir=None)
    return Timed(seed, results["test_acc"], results["train_seconds"], results["test_seconds"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = compose_cfg(args.overrides)
    device = resolve_device(cfg.device)
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; "
        f"model={cfg.model.name} epochs={cfg.epochs} batch_size={cfg.batch_size} lr={cfg.lr} "
        f"precision={cfg.precision} compile={cfg.compile} tta={cfg.tta}",
        flush=True,
    )
    if args.warmup > 0:
        t0 = time.perf_counter()
        timed_run(cfg, args.seed, epochs=min(args.warmup, cfg.epochs))
        print(f"warm-up: {args.warmup} epoch(s), {time.perf_counter() - t0:.1f} s", flush=True)

    runs = []
    for i in range(args.runs):
        r = timed_run(cfg, args.seed + i)
        runs.append(r)
        print(
            f"run {i + 1} seed {r.seed}: test acc {r.test_acc:.2f}%  {r.seconds:.2f} s "
            f"(train {r.train_seconds:.2f} s + test {r.test_seconds:.2f} s)",
            flush=True,
        )
    accs = [r.test_acc for r in runs]
    secs = [r.seconds for r in runs]
    spread = statistics.stdev(accs) if len(accs) > 1 else math.nan
    print(
        f"\n{len(runs)} runs: mean test acc {statistics.mean(accs):.2f}% (std {spread:.2f}, "
        f"min {min(accs):.2f}, max {max(accs):.2f}; {sum(a >= TARGET for a in accs)} of "
        f"{len(accs)} >= {TARGET:g}%); seconds: median {statistics.median(secs):.2f}, "
        f"mean {statistics.mean(secs):.2f} (training + final test pass)"
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"bench_fast.py: {exc}") from None
