"""What does batched augmentation cost next to training? Augmentation time per epoch as a
fraction of one LeNet-5 training epoch, on the CPU.

For each repeat the script times (a) one training epoch of LeNet-5 (SGD, batch 64, no
augmentation, DeviceLoader + train_one_epoch as `cifar-run` uses them) and (b) one pass of
the augmentation set over the same images in batches of 64, interleaved so that load on a
shared machine hits both alike, and prints the medians and their ratio. Images are random
uint8 (timing does not depend on content).

Example (the figure in docs/benchmarks.md):
    PYTHONPATH=src python scripts/bench_augment.py --images 40000 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from cifar_run.config.compose import CONF_DIR
from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD
from cifar_run.data.augment import build_augment
from cifar_run.data.loader import DeviceLoader
from cifar_run.data.sources import ArraySplit
from cifar_run.engine.loop import train_one_epoch
from cifar_run.models.lenet import LeNet5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=40000, help="training images per epoch (default 40000)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["standard"],
        help="augmentation sets from conf/augment/ to time (default: standard)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    return parser.parse_args()


def time_training(split: ArraySplit, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = DeviceLoader(
        split,
        batch_size,
        device=torch.device("cpu"),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        shuffle=True,
        seed=seed,
    )
    stats = train_one_epoch(
        model, batches, optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu")
    )
    return stats.seconds


def time_augment(images: torch.Tensor, augment, batch_size: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        augment(images[start : start + batch_size], g)
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    split = ArraySplit(images, labels)
    sets = {
        name: build_augment(OmegaConf.load(CONF_DIR / "augment" / f"{name}.yaml"))
        for name in args.sets
    }

    # One untimed round warms up allocators and kernels.
    time_training(ArraySplit(images[:512], labels[:512]), args.batch_size, 0)
    for aug in sets.values():
        time_augment(images[:512], aug, args.batch_size, 0)

    train_s: list[float] = []
    aug_s: dict[str, list[float]] = {name: [] for name in sets}
    for r in range(args.repeats):
        train_s.append(time_training(split, args.batch_size, r))
        for name, aug in sets.items():
            aug_s[name].append(time_augment(images, aug, args.batch_size, r))
        print(
            f"repeat {r + 1}/{args.repeats}: train {train_s[-1]:.2f} s, "
            + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in aug_s.items()),
            flush=True,
        )

    train_med = statistics.median(train_s)
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.images} images, batch {args.batch_size}, "
        f"median of {args.repeats}"
    )
    print(f"LeNet-5 training epoch: {train_med:.2f} s")
    for name, values in aug_s.items():
        med = statistics.median(values)
        print(f"augment={name}: {med:.2f} s per epoch = {100 * med / train_med:.1f}% of training")


if __name__ == "__main__":
    main()
