"""airbench94 on the data cifar-run trains on, timed its own way: the yardstick for
`experiment=fast` (scripts/bench_fast.py) on the same GPU and the same images.

airbench (KellerJordan/cifar10-airbench; `pip install airbench`, not a cifar-run dependency)
reads CIFAR-10 from `cifar10/train.pt` and `cifar10/test.pt` (uint8 NHWC images, labels,
class names) and downloads it when they are missing. This script writes those two files
from cifar-run's own `data` group (all 50,000 training images: airbench holds none out) into
a scratch folder, so both train on identical pixels; on an image folder such as
../shared/data/cifar10-jpeg (JPEG quality 75) accuracies are a few points below the
published figures for the original arrays.

Each run is `airbench.train94(run=i)` after one `airbench.warmup94()`; the accuracy (flip
and translate test-time augmentation) and seconds are airbench's own: CUDA events around the
training epochs, the whitening initialisation and the final test pass. Needs a CUDA GPU.

    python scripts/bench_airbench.py --runs 5 data=imagefolder data.root=PATH
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import open_dict

from cifar_run.config.compose import compose_config
from cifar_run.data.sources import load_splits
from cifar_run.errors import UserError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run data overrides")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    return parser.parse_args()


def write_airbench_data(overrides: list[str], folder: Path) -> None:
    """cifar-run's train (all of it) and test splits as airbench's cifar10/*.pt files."""
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.data.val_size = 0  # airbench trains on every training image
    splits = load_splits(cfg.data)
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, split in (("train", splits.train), ("test", splits.test)):
        torch.save(
            {
                "images": split.images.permute(0, 2, 3, 1).contiguous(),  # NCHW -> NHWC
                "labels": split.labels,
                "classes": list(splits.classes),
            },
            folder / "cifar10" / f"{name}.pt",
        )


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def main() -> None:
    args = parse_args()
    try:
        import airbench
        import airbench.utils
    except ImportError:
        raise SystemExit(
            "bench_airbench.py: needs the airbench package (pip install airbench)"
        ) from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_airbench.py: airbench needs a CUDA GPU; none is available")

    finals: list[tuple[float, float]] = []  # (test accuracy, seconds) of each run
    report = airbench.utils.print_training_details

    def capture(variables: dict, is_final_entry: bool) -> None:
        # train94 returns the model; its accuracy and time are only in this last table row.
        if is_final_entry:
            finals.append((variables["tta_val_acc"], variables["total_time_seconds"]))
        report(variables, is_final_entry)

    airbench.utils.print_training_details = capture
    with tempfile.TemporaryDirectory() as scratch:
        write_airbench_data(args.overrides, Path(scratch))
        with working_dir(Path(scratch)):
            print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
            airbench.warmup94()
            finals.clear()
            for i in range(args.runs):
                airbench.train94(run=i)
    accs = [100 * acc for acc, _ in finals]
    secs = [s for _, s in finals]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(
        f"\nairbench94, {len(accs)} runs: mean test acc {statistics.mean(accs):.2f}% "
        f"(std {spread:.2f}, min {min(accs):.2f}, max {max(accs):.2f}); seconds: median "
        f"{statistics.median(secs):.2f}, mean {statistics.mean(secs):.2f}"
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"bench_airbench.py: {exc}") from None
