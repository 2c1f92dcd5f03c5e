"""Take the GPU checks of issue 7 to a lent device machine in one call.

The GPU machine this workplace lends (its `device` tool) has torch, pandas, matplotlib and
tqdm but not Hydra or OmegaConf, cannot reach the internet, and receives the repository
plus at most 64 MiB of carried paths; ../shared beside the checkout does not travel. So:

  here:   python scripts/gpu_kit.py pack [--data ../shared/data/cifar10-jpeg] [--airbench]
          writes .gpu/ (git-ignored): site/ with hydra, omegaconf and antlr4 copied from
          this environment (pure Python, no caches; with --airbench also airbench, fetched
          from PyPI by pip), and the image folder as one file of
          the JPEGs' bytes (images.bin) with its index (index.json.gz): 55 MB for the
          60,000 CIFAR-10 JPEGs, where a zip's per-file headers would pass the limit.
          Prints the size against the limit.
  there:  device run, carry [".gpu"], command
          `python3 scripts/gpu_kit.py run --budget 480`
          rebuilds the image folder under /tmp, puts .gpu/site and src on PYTHONPATH and
          runs the checks below in order, each under its own time limit and the whole under
          --budget seconds, logging each to $OUT/<name>.log with a summary at the end
          ($OUT/summary.txt). A check that would not fit in what is left is skipped.

Checks (docs/benchmarks.md, "GPU"), in order of what matters most:
  env       nvidia-smi and torch's view of the GPU
  fast      scripts/bench_fast.py --runs 5 (experiment=fast, 24 epochs) on the images
  airbench  scripts/bench_airbench.py --runs 5, if airbench is importable (pack --airbench)
  bench     scripts/bench.py device=cuda: LeNet-5 (report 000, 2 rounds) and ResNet-18
            (batch 128, 2 rounds of 30 steps)
  tests     the test suite (its CUDA paths, which CI's CPU never takes)

`run --smoke` runs the same plumbing with tiny settings on whatever device there is (here
the CPU), to check the kit without a GPU; `run --only NAME ...` picks checks.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpu"
LIMIT = 64 << 20  # bytes a device call may carry, the repository included
PACKAGES = ("hydra", "omegaconf", "antlr4")  # what the GPU machine's image lacks
AIRBENCH = "0.1.8"  # the version of docs/benchmarks.md's airbench figures


def pack_images(folder: Path, out: Path) -> int:
    """Every file under `folder` into out/images.bin (bytes, one after another) and
    out/index.json.gz ([relative path, size] in that order). Returns the bytes written."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    index = []
    with open(out / "images.bin", "wb") as blob:
        for path in files:
            data = path.read_bytes()
            blob.write(data)
            index.append([path.relative_to(folder).as_posix(), len(data)])
    with gzip.open(out / "index.json.gz", "wt") as f:
        json.dump(index, f)
    return (out / "images.bin").stat().st_size + (out / "index.json.gz").stat().st_size


def unpack_images(kit: Path, folder: Path) -> int:
    """Rebuild the image folder that pack_images packed. Returns how many files."""
    with gzip.open(kit / "index.json.gz", "rt") as f:
        index = json.load(f)
    with open(kit / "images.bin", "rb") as blob:
        for rel, size in index:
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob.read(size))
    return len(index)


def tree_bytes(folder: Path) -> int:
    """The bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_packages(site: Path) -> int:
    """This environment's copies of PACKAGES into `site`, without bytecode caches. Returns
    the bytes copied."""
    import importlib

    for name in PACKAGES:
        source = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return sum(tree_bytes(site / name) for name in PACKAGES)


def fetch_airbench(site: Path, version: str = AIRBENCH) -> None:
    """airbench (pure Python, torch and torchvision only) from PyPI into `site`: its sdist
    through pip, which reaches the registry here; the GPU machine cannot."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                f"airbench=={version}",
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("airbench-*.tar.gz")
        with tarfile.open(sdist) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        shutil.copytree(
            Path(tmp) / sdist.name.removesuffix(".tar.gz") / "airbench", site / "airbench"
        )


def tracked_bytes() -> int:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = [ROOT / name.decode() for name in names if name]
    return sum(p.stat().st_size for p in paths if p.is_file())


def pack(data: Path, kit: Path, airbench: bool = False) -> None:
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"gpu_kit.py pack: --data {data}: no train/ and test/ folders there")
    if kit.exists():
        shutil.rmtree(kit)
    (kit / "site").mkdir(parents=True)
    images = pack_images(data, kit)
    if airbench:
        fetch_airbench(kit / "site")
    copy_packages(kit / "site")
    site = tree_bytes(kit / "site")  # airbench included
    repo = tracked_bytes()
    total = images + site + repo
    mib = 1 << 20
    print(f"images {images / mib:.1f} MiB, packages {site / mib:.1f} MiB", end=", ")
    print(f"repository {repo / mib:.1f} MiB: {total / mib:.1f} MiB of {LIMIT >> 20} a call carries")
    if total > LIMIT:
        raise SystemExit("gpu_kit.py pack: over the limit; the call would be refused")


def checks(data: str, smoke: bool, py: str) -> list[tuple[str, list[list[str]], int]]:
    """(name, commands, seconds allowed) for each check, in order."""
    d = [f"data.root={data}", "data=imagefolder"]
    if smoke:  # the plumbing only: tiny runs on any device
        d += ["data.subset=20"]
        fast = [[py, "scripts/bench_fast.py", "--runs", "1", "--warmup", "0", *d, "epochs=1"]]
        bench = [
            [
                py,
                "scripts/bench.py",
                "--repeats",
                "1",
                "--max-steps",
                "3",
                "experiment=report000",
                *d,
            ]
        ]
        tests = [[py, "-m", "pytest", "-q", "-x", "tests/test_fp32_linear.py"]]
    else:
        fast = [[py, "scripts/bench_fast.py", "--runs", "5", *d]]
        bench = [
            [
                py,
                "scripts/bench.py",
                "--repeats",
                "2",
                "--flops",
                "device=cuda",
                "experiment=report000",
                *d,
            ],
            [
                py,
                "scripts/bench.py",
                "--repeats",
                "2",
                "--max-steps",
                "30",
                "--flops",
                "device=cuda",
                "model=resnet18",
                "augment=standard",
                "batch_size=128",
                "epochs=1",
                *d,
            ],
        ]
        tests = [[py, "-m", "pytest", "-q", "-x", "-n", "8", "tests"]]
    env = [
        ["nvidia-smi"],
        [
            py,
            "-c",
            "import torch; print(torch.__version__, torch.cuda.is_available(), "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')",
        ],
    ]
    airbench = [[py, "scripts/bench_airbench.py", "--runs", "1" if smoke else "5", *d]]
    return [
        ("env", env, 30),
        ("fast", fast, 200),
        ("airbench", airbench, 120),
        ("bench", bench, 240),
        ("tests", tests, 300),
    ]


def run_checks(args: argparse.Namespace) -> int:
    start = time.monotonic()
    out = Path(args.out or os.environ.get("OUT") or "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    kit = Path(args.kit)
    data = Path(args.data) if args.data else Path("/tmp/cifar10-jpeg")
    if not args.data:
        if not (kit / "images.bin").is_file():
            raise SystemExit(f"gpu_kit.py run: no {kit}/images.bin: run `pack` here and carry .gpu")
        if not (data / "train").is_dir():
            print(f"unpacked {unpack_images(kit, data)} images into {data}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(kit / "site"), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    py = sys.executable
    summary = []
    for name, commands, allowed in checks(str(data), args.smoke, py):
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.monotonic() - start)
        if allowed > left:
            summary.append(f"{name}: skipped, needs {allowed} s and {left:.0f} s are left")
            continue
        if name == "airbench":
            probe = subprocess.run([py, "-c", "import airbench"], env=env, capture_output=True)
            if probe.returncode:
                summary.append(f"{name}: skipped, airbench is not importable (pack --airbench)")
                continue
        log = out / f"{name}.log"
        t0 = time.monotonic()
        status = "ok"
        with open(log, "w") as f:
            for command in commands:
                f.write(f"$ {' '.join(command)}\n")
                f.flush()
                limit = allowed - (time.monotonic() - t0)
                try:
                    rc = subprocess.run(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        timeout=limit,
                    ).returncode
                except subprocess.TimeoutExpired:
                    status = f"timed out after {allowed} s"
                    break
                except FileNotFoundError:
                    rc = 127
                if rc:
                    status = f"exit {rc}"
        seconds = time.monotonic() - t0
        summary.append(f"{name}: {status} in {seconds:.0f} s ({log.name})")
        print(f"== {name}: {status} in {seconds:.0f} s; the end of {log.name}:", flush=True)
        print("".join(log.read_text().splitlines(keepends=True)[-15:]), flush=True)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(["== summary", *summary]))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: write .gpu/ (packages and images)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    p.add_argument(
        "--airbench", action="store_true", help=f"add airbench {AIRBENCH} from PyPI (pip)"
    )
    r = sub.add_parser("run", help="there: unpack and run the checks")
    r.add_argument("--budget", type=float, default=480, help="seconds for all checks")
    r.add_argument("--only", nargs="+", help="these checks only (env fast airbench bench tests)")
    r.add_argument("--smoke", action="store_true", help="tiny settings, any device")
    r.add_argument("--data", help="an image folder to use instead of the packed one")
    r.add_argument("--out", help="folder for the logs (default $OUT, else gpu-out)")
    r.add_argument("--kit", default=str(KIT), help="the packed folder (default .gpu)")
    args = parser.parse_args()
    if args.verb == "pack":
        pack(Path(args.data), KIT, airbench=args.airbench)
    else:
        sys.exit(run_checks(args))


if __name__ == "__main__":
    main()
