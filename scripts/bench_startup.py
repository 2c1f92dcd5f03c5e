"""Start-up costs: a whole small `cifar-run` job, the first decode of an image folder, and
later loads of the same folder from the decode cache.

  run     wall time of `cifar-run data=imagefolder data.root=ROOT data.subset=20 epochs=1
          data.val_size=0.1` as a subprocess, from exec to exit: imports, config,
          data from the warm cache, one epoch, test, outputs and plots.
  decode  `cifar_run.data.sources.load_imagefolder(ROOT, cache_dir)` with an empty cache directory:
          listing, decoding every JPEG, writing the cache.
  cache   the same call again, now reading the cache.

Each is repeated --repeats times (a fresh empty cache folder per decode) and the median
printed. Example (the figures in docs/benchmarks.md):

    python scripts/bench_startup.py --root ../shared/data/cifar10-jpeg --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_run(root: Path, workdir: Path, cache: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "cifar_run",
        "data=imagefolder",
        f"data.root={root}",
        "data.subset=20",
        "data.val_size=0.1",
        "epochs=1",
    ]
    env = {**os.environ, "CIFAR_RUN_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def time_load(root: Path, cache: Path) -> float:
    from cifar_run.data.sources import load_imagefolder

    t0 = time.perf_counter()
    load_imagefolder(root, cache)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="image folder (train/, test/)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = args.root.resolve()

    from cifar_run.data.sources import load_imagefolder  # noqa: F401  (import cost out of the timings)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        decode, cache_loads, runs = [], [], []
        for r in range(args.repeats):
            cache = tmp / f"cache{r}"
            decode.append(time_load(root, cache))
            cache_loads.append(time_load(root, cache))
            print(f"round {r + 1}: decode {decode[-1]:.2f} s, cache load {cache_loads[-1]:.2f} s")
            if r > 0:  # keep one cache for the runs below, not one 180 MB file per round
                for f in cache.iterdir():
                    f.unlink()
        for r in range(args.repeats):
            runs.append(time_run(root, tmp, tmp / "cache0"))
            print(f"round {r + 1}: 1-epoch subset=20 run {runs[-1]:.2f} s wall")

    def line(name: str, xs: list[float]) -> str:
        every = ", ".join(f"{x:.2f}" for x in xs)
        return f"  {name:28s} median {statistics.median(xs):6.2f} s  (all: {every})"

    print("\nsummary")
    print(line("first decode (60k images)", decode))
    print(line("load from cache", cache_loads))
    print(line("cifar-run 1 epoch subset=20", runs))


if __name__ == "__main__":
    main()
