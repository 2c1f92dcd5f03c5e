"""What a batch costs to prepare: DeviceLoader against the plain way of writing the same.

DeviceLoader gathers each batch from the uint8 images with `index_select` (on the CPU, for
channels_last batches without augmentation, from images held as NHWC rows), augments it,
and turns it into normalized float values in the batches' memory format (on the CPU: a
conversion to float as the batch lies in memory and one `torch.addcmul` in place with
factors per value of an image; on CUDA one `addcmul` writing the float layout), with one
CPU thread for a small batch. The reference arm is the way one writes it: `images[idx]`
from NCHW images, then reorder to the memory format while still uint8, convert to float,
multiply, add: four passes over the batch, on every thread. For each batch size the script
times
full epochs of both loaders over the same random uint8 images (timing does not depend on
content), alternating which goes first, for --rounds rounds, and prints the median
microseconds per batch of each, the median per-round ratio and the largest difference
between the two arms' values (a fused multiply-add rounds once, so up to the last bit).

Example (the figures in docs/benchmarks.md, "Preparing batches"):
    PYTHONPATH=src python scripts/bench_loader.py --batch-sizes 64 128 512 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402

from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from cifar_run.data.augment import build_augment  # noqa: E402
from cifar_run.data.loader import DeviceLoader  # noqa: E402
from cifar_run.data.sources import ArraySplit  # noqa: E402


class PlainLoader(DeviceLoader):
    """DeviceLoader with the indexing and the four passes of the reference arm."""

    def __init__(self, split: ArraySplit, *args: Any, **kwargs: Any) -> None:
        super().__init__(split, *args, **kwargs)
        self.images = split.images.to(self.device)  # NCHW rows, as a plain script holds them

    def _threads(self, batch: int) -> AbstractContextManager[None]:
        return nullcontext()  # every thread, as a plain script runs

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        return x.float() * self.scale + self.shift


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--images", type=int, default=10_000, help="images per epoch")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--augment", default="none", help="cifar-run augment set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def _epoch_us(loader: DeviceLoader, device: torch.device) -> float:
    """Microseconds per batch over one epoch."""
    start = time.perf_counter()
    for _batch in loader:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(loader) * 1e6


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    split = ArraySplit(images, torch.randint(0, 10, (args.images,), generator=generator))
    augment = build_augment(compose_config([f"augment={args.augment}"]).augment)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"{args.images} images, augment={args.augment}, channels_last batches"
    )
    for batch_size in args.batch_sizes:
        arms = {
            name: cls(
                split,
                batch_size,
                device=device,
                mean=CIFAR10_MEAN,
                std=CIFAR10_STD,
                shuffle=True,
                augment=augment,
                memory_format=torch.channels_last,
            )
            for name, cls in (("plain", PlainLoader), ("DeviceLoader", DeviceLoader))
        }
        (x_old, _), (x_new, _) = (next(iter(loader)) for loader in arms.values())
        diff = (x_old - x_new).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(args.rounds):
            for name in list(arms) if r % 2 == 0 else list(reversed(arms)):
                times[name].append(_epoch_us(arms[name], device))
        old, new = (statistics.median(t) for t in times.values())
        ratio = statistics.median(a / b for a, b in zip(*times.values(), strict=True))
        print(
            f"batch {batch_size}: plain {old:.1f} us, DeviceLoader {new:.1f} us per batch "
            f"(medians of {args.rounds} rounds); {ratio:.2f}x per round; largest difference "
            f"{diff:.2e}"
        )


if __name__ == "__main__":
    main()
