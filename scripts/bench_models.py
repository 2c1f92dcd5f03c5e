"""Every model in conf/model/ at its usual batch size: speed=auto against speed=plain
against the plain PyTorch loop, as one Markdown table (docs/benchmarks.md).

Each model runs scripts/bench.py in its own process (with --isolate unless --no-isolate),
so one model's threads and heap never touch the next one's timing.
Extra arguments are passed to every bench.py call as cifar-run overrides, e.g. the data:

    PYTHONPATH=src python scripts/bench_models.py --repeats 2 --images 2560 \\
        data=imagefolder data.root=../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# The batch size each model is trained at in its report (conf/experiment/), else the
# project's default for its family.
BATCH = {
    "lenet5": 64,  # report 000
    "resnet18_tv": 64,  # report 000
    "resnet9": 64,  # report 001
    "cnn5": 60,  # report 002
    "resnet32": 128,  # report 003
    "cnn7": 64,  # report 004
    "resnet9_page": 512,  # experiment=fast
    "cnn": 64,
    "resnet18": 128,
    "resnet20": 128,
    "resnet56": 128,
}
SUMMARY = re.compile(r"^\s+(auto|plain|loop)\s+([\d.]+) images/s", re.M)
RATIO = re.compile(r"ratio (auto/plain|auto/loop|plain/loop): median ([\d.]+)x \(rounds: ([^)]*)\)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run overrides for every model")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model (default 3)")
    parser.add_argument(
        "--images", type=int, default=2560, help="images per round (at least 10 steps; 2560)"
    )
    parser.add_argument("--models", default="", help="comma-separated subset of conf/model/")
    parser.add_argument("--no-isolate", action="store_true", help="arms share one process")
    return parser.parse_args()


def bench(model: str, args: argparse.Namespace) -> str:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("bench.py")),
        "--repeats",
        str(args.repeats),
        "--max-steps",
        str(max(10, args.images // BATCH.get(model, 64))),
        *([] if args.no_isolate else ["--isolate"]),
        f"model={model}",
        f"batch_size={BATCH.get(model, 64)}",
        "epochs=1",
        *args.overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_models.py: {model}: bench.py failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def row(model: str, out: str) -> str:
    rates = dict(SUMMARY.findall(out))
    ratios = {name: (value, rounds) for name, value, rounds in RATIO.findall(out)}
    cells = [model, str(BATCH.get(model, 64))]
    cells += [f"{float(rates[a]):,.0f}" for a in ("auto", "plain", "loop")]
    cells += [f"{ratios[r][0]}x ({ratios[r][1]})" for r in ("auto/plain", "auto/loop")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    models = [m for m in args.models.split(",") if m] or sorted(p.stem for p in CONF.glob("*.yaml"))
    header = ["model", "batch", "auto, images/s", "plain", "loop"]
    header += ["auto/plain (rounds)", "auto/loop (rounds)"]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        out = bench(model, args)
        machine = next((x for x in out.splitlines() if x.startswith("machine:")), "")
        print(row(model, out), flush=True)
        print(f"<!-- {model}: {machine} -->", flush=True)


if __name__ == "__main__":
    main()
