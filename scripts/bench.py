"""cifar-run with its speed tricks, without them, and the loop people write themselves.

For a config given as cifar-run overrides, the script trains up to three ways, in an order
that rotates each round so that load from other jobs on a shared machine hits all alike,
for --repeats rounds of `epochs` epochs each:

  auto   cifar-run as configured (`speed=auto` unless the overrides say otherwise): the
         data as one uint8 tensor, batches gathered, augmented and normalized by
         DeviceLoader, train_one_epoch with the config's `precision`, and the speed tricks
         that suit the model (cifar_run.speed.setup, docs/speed.md).
  plain  the same with `speed=plain`: no tricks, whole batches, NCHW, torch's modules.
  loop   the plain PyTorch loop: a torchvision-style Dataset turning each uint8 image
         into a PIL image and applying torchvision transforms (RandomCrop(32, padding)
         and RandomHorizontalFlip when augment=standard, then ToTensor and Normalize),
         a DataLoader with 2 workers, an fp32 model, `loss.item()` per step.

Every arm gets the same model (built from the config, same seed, same initial weights), the
same data and split, batch size, optimizer, learning-rate schedule and normalization, and
the same torch threads. Each round uses seed `seed + round`, so the spread of accuracies
over rounds shows the noise. Reported: training images/s of every round (the epochs'
training time only, no evaluation), the medians, the median of the per-round ratios
auto/plain, auto/loop and plain/loop, and the test accuracy of each arm after the epochs
(the last epoch's weights; no validation-based selection, so they compare like with like).

With --isolate every round of each arm runs in a fresh process under its own default
OpenMP settings: auto and plain with the short spin cifar-run sets (unless the environment
sets OMP_WAIT_POLICY or GOMP_SPINCOUNT), the loop with the environment as given, i.e.
libgomp's long spinning waits, as a user's own script runs. Without it all arms share this
process and cifar-run's setting, which is kinder to the loop (its DataLoader workers and
spinning threads oversubscribe the cores).

The CPU is the default; `device=cuda` runs every arm on the GPU: cifar-run with the data
resident there, the loop moving each batch from its DataLoader with `.to(device)`. Each
arm's timed interval ends in a host synchronisation.

With --flops it also counts the model's FLOPs per image (torch.utils.flop_counter: forward,
and forward + backward as trained), times large fp32 and bf16 matrix multiplies as the
machine's ceiling, and prints the achieved FLOP/s of each arm against it.

Examples (the figures in docs/benchmarks.md):
    PYTHONPATH=src python scripts/bench.py --isolate --repeats 3 --max-steps 60 \\
        model=lenet5 batch_size=64 data=imagefolder data.root=../shared/data/cifar10-jpeg
    PYTHONPATH=src python scripts/bench.py --isolate --repeats 3 --max-steps 30 \\
        model=resnet18 augment=standard batch_size=128 epochs=1 \\
        data=imagefolder data.root=../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from cifar_run.constants import set_openmp_defaults  # torch-free

# --isolate's loop processes get the environment as given (a plain script's defaults).
PLAIN_ENV = "CIFAR_RUN_BENCH_PLAIN_ENV"
GIVEN_ENV = dict(os.environ)
if os.environ.get(PLAIN_ENV) != "1":
    set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from torch import nn  # noqa: E402

from cifar_run.config.checks import validate  # noqa: E402
from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.data.augment import build_augment, normalization  # noqa: E402
from cifar_run.data.loader import DeviceLoader  # noqa: E402
from cifar_run.data.sources import ArraySplit, Splits, load_splits  # noqa: E402
from cifar_run.engine.loop import evaluate, train_one_epoch  # noqa: E402
from cifar_run.engine.optim import Schedule, build_optimizer, build_scheduler  # noqa: E402
from cifar_run.engine.precision import resolve_precision  # noqa: E402
from cifar_run.errors import UserError  # noqa: E402
from cifar_run.models import build_model  # noqa: E402
from cifar_run.run import EVAL_BATCH_SIZE, resolve_device, seed_everything  # noqa: E402
from cifar_run.speed.settings import PLAIN_SETTINGS, SpeedSettings  # noqa: E402
from cifar_run.speed.setup import speed_setup  # noqa: E402
from cifar_run.speed.threads import set_threads  # noqa: E402

REFERENCE_WORKERS = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="cifar-run overrides, e.g. model=resnet18 batch_size=128"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the arms (default 3)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each epoch after this many steps: a throughput measurement only, the test "
        "set is then not evaluated",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated arms to run, of {', '.join(ARMS)} (default all), or no-KEY: "
        "auto with speed.KEY=false, e.g. no-conv_grads",
    )
    parser.add_argument(
        "--flops", action="store_true", help="FLOPs per image, matmul ceiling, achieved FLOP/s"
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="each arm's round in a fresh process at its own default OpenMP settings",
    )
    # --isolate's child processes: one arm, one round, its result as a JSON line.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS and a not in WITHOUT]
    if unknown or not args.arms:
        parser.error(
            f"--arms {','.join(args.arms)}: choose from {', '.join(ARMS)}, or {', '.join(WITHOUT)}"
        )
    return args


# ---------------------------------------------------------------------------------------------
# Config and data


def compose_cfg(overrides: list[str]) -> DictConfig:
    try:
        cfg = compose_config(["device=cpu", *overrides])
        with open_dict(cfg):
            cfg.prune = 0.0  # the bench times training; a pruning stage is not part of it
        validate(cfg)
    except UserError as exc:
        raise SystemExit(f"bench.py: {exc}") from None
    if cfg.augment.name not in ("none", "standard"):
        raise SystemExit(f"bench.py: augment={cfg.augment.name}: the loop arm has none|standard")
    if cfg.sched.get("monitor") is not None:
        raise SystemExit(f"bench.py: sched={cfg.sched.name}: plateau schedules need validation")
    return cfg


@dataclass
class ArmResult:
    images_per_s: float
    test_acc: float
    train_loss: float
    epoch_rates: list[float] = field(default_factory=list)
    cpu_ms_per_image: float = math.nan  # CPU time of every process and thread of the arm


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the
    DataLoader workers, which exit at the end of each epoch)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _limited(batches: Iterable, max_steps: int | None) -> Iterable:
    if max_steps is None:
        return batches

    def gen() -> Iterator:
        for i, batch in enumerate(batches):
            if i >= max_steps:
                break
            yield batch

    return gen()


def _steps(n: int, batch_size: int, max_steps: int | None) -> int:
    steps = math.ceil(n / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


@dataclass
class Training:
    """What both arms share, built in one place so that they cannot drift apart."""

    device: torch.device
    model: nn.Module  # on `device`
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: nn.Module


def shared_training(cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None) -> Training:
    """The round's seed, then model (same initial weights for both arms) on the config's
    device, optimizer, learning-rate schedule and training loss."""
    seed_everything(seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    schedule = build_scheduler(
        cfg.sched,
        optimizer,
        epochs=cfg.epochs,
        steps_per_epoch=_steps(len(splits.train), cfg.batch_size, max_steps),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg.optim.get("label_smoothing", 0.0)))
    return Training(device, model, optimizer, schedule, criterion)


# ---------------------------------------------------------------------------------------------
# cifar-run: the pieces run.py composes


def train_auto(cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None) -> ArmResult:
    return train_cifar_run(cfg, splits, seed, max_steps, SpeedSettings.from_config(cfg.speed))


def train_plain(cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None) -> ArmResult:
    return train_cifar_run(cfg, splits, seed, max_steps, PLAIN_SETTINGS)


def train_cifar_run(
    cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None, settings: SpeedSettings
) -> ArmResult:
    threads = torch.get_num_threads()
    try:
        return _train_cifar_run(cfg, splits, seed, max_steps, settings)
    finally:  # the next arm gets every thread (the speed layer's hooks may leave one)
        torch.set_num_threads(threads)


def _train_cifar_run(
    cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None, settings: SpeedSettings
) -> ArmResult:
    t = shared_training(cfg, splits, seed, max_steps)
    device, model, optimizer = t.device, t.model, t.optimizer
    schedule, criterion = t.schedule, t.criterion
    speed = speed_setup(model, device, cfg.precision, cfg.compile, settings)
    net, precision, scaler = speed.net, speed.precision, speed.scaler
    mean, std = normalization(cfg.augment.normalize, splits.train.images)
    norm = {
        "device": device,
        "mean": mean,
        "std": std,
        "memory_format": speed.memory_format,
    }
    train = DeviceLoader(
        splits.train,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        augment=build_augment(cfg.augment),
        **norm,
    )
    test = DeviceLoader(splits.test, EVAL_BATCH_SIZE, **norm)
    rates, images, seconds, loss = [], 0, 0.0, math.nan
    cpu = cpu_seconds()
    for _ in range(cfg.epochs):
        stats = train_one_epoch(
            net,
            _limited(train, max_steps),
            optimizer,
            criterion,
            device=device,
            step_scheduler=schedule.step_batch,
            desc="cifar-run",
            autocast=precision.dtype,
            scaler=scaler,
            steps=speed,
        )
        schedule.step_epoch({"val_loss": math.nan, "val_acc": math.nan})
        rates.append(stats.images / stats.seconds)
        images, seconds, loss = images + stats.images, seconds + stats.seconds, stats.loss
    cpu = cpu_seconds() - cpu
    acc = math.nan
    if max_steps is None:
        acc = evaluate(net, test, nn.CrossEntropyLoss(), device=device, autocast=precision.dtype)
        acc = acc.acc
    return ArmResult(images / seconds, acc, loss, rates, 1e3 * cpu / images)


# ---------------------------------------------------------------------------------------------
# The loop: what a plain PyTorch script does


class PILDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR10 way: one uint8 HWC array per image, a PIL image per item."""

    def __init__(self, split: ArraySplit, transform: nn.Module) -> None:
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def loop_transforms(cfg: DictConfig, mean, std, train: bool):  # noqa: ANN001, ANN201
    import torchvision.transforms as T

    steps = []
    if train and cfg.augment.name == "standard":
        if cfg.augment.padding > 0:
            steps.append(T.RandomCrop(32, padding=cfg.augment.padding))
        steps.append(T.RandomHorizontalFlip(p=cfg.augment.flip))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def train_loop(cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None) -> ArmResult:
    from torch.utils.data import DataLoader

    t = shared_training(cfg, splits, seed, max_steps)
    device, model, optimizer = t.device, t.model, t.optimizer
    schedule, criterion = t.schedule, t.criterion
    mean, std = normalization(cfg.augment.normalize, splits.train.images)
    train_loader = DataLoader(
        PILDataset(splits.train, loop_transforms(cfg, mean, std, train=True)),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=REFERENCE_WORKERS,
        generator=torch.Generator().manual_seed(seed),
    )
    test_loader = DataLoader(
        PILDataset(splits.test, loop_transforms(cfg, mean, std, train=False)),
        batch_size=EVAL_BATCH_SIZE,
        num_workers=REFERENCE_WORKERS,
    )
    rates, images, seconds, loss = [], 0, 0.0, math.nan
    cpu = cpu_seconds()
    for _ in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        n, running = 0, 0.0
        for step, (x, y) in enumerate(train_loader):
            if max_steps is not None and step >= max_steps:
                break
            x, y = x.to(device), y.to(device)
            out = model(x)
            batch_loss = criterion(out, y)
            optimizer.zero_grad()
            batch_loss.backward()
            optimizer.step()
            if schedule.step_batch is not None:
                schedule.step_batch()
            running += batch_loss.item() * len(y)
            n += len(y)
        dt = time.perf_counter() - t0
        schedule.step_epoch({"val_loss": math.nan, "val_acc": math.nan})
        rates.append(n / dt)
        images, seconds, loss = images + n, seconds + dt, running / n
    cpu_ms = 1e3 * (cpu_seconds() - cpu) / images
    if max_steps is not None:
        return ArmResult(images / seconds, math.nan, loss, rates, cpu_ms)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return ArmResult(images / seconds, 100.0 * correct / total, loss, rates, cpu_ms)


# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_image(cfg: DictConfig, batch: int = 32) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of the model in training mode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model)
    x = torch.randn(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return f / batch, (f + b) / batch


def matmul_ceiling(
    dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10
) -> float:
    """The best FLOP/s of an n x n matrix multiply in `dtype` over a few tries."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


ARMS = {"auto": train_auto, "plain": train_plain, "loop": train_loop}
# no-KEY: auto with one trick switched off, to measure what that trick alone gains.
WITHOUT = [f"no-{f.name}" for f in dataclasses.fields(SpeedSettings)]


def arm(name: str) -> Callable[[DictConfig, Splits, int, int | None], ArmResult]:
    """The training function of an arm: auto, plain, loop or no-KEY."""
    if name in ARMS:
        return ARMS[name]
    key = name.removeprefix("no-")

    def without(cfg: DictConfig, splits: Splits, seed: int, max_steps: int | None) -> ArmResult:
        settings = dataclasses.replace(SpeedSettings.from_config(cfg.speed), **{key: False})
        return train_cifar_run(cfg, splits, seed, max_steps, settings)

    return without


def ratio_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """The (numerator, denominator) pairs whose ratios are printed for these arms."""
    pairs = [p for p in RATIOS if p[0] in arms and p[1] in arms]
    return pairs + [("auto", a) for a in arms if a in WITHOUT and "auto" in arms]


# The pairs whose ratios are printed: (numerator, denominator).
RATIOS = (("auto", "plain"), ("auto", "loop"), ("plain", "loop"))
RESULT_TAG = "bench-result: "


def run_child(args: argparse.Namespace, cfg: DictConfig) -> None:
    """One arm, one round, in this fresh process (--isolate); the result as a JSON line."""
    set_threads(cfg.get("threads"))
    res = arm(args.child)(cfg, load_splits(cfg.data), args.child_seed, args.max_steps)
    result = {**dataclasses.asdict(res), "openmp": _openmp(dict(os.environ))}
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_isolated(name: str, seed: int, args: argparse.Namespace) -> tuple[ArmResult, str]:
    """One arm, one round, in a fresh process; its result and the OpenMP settings it saw."""
    cmd = [sys.executable, __file__, "--child", name, "--child-seed", str(seed)]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    env = dict(os.environ) if name != "loop" else {**GIVEN_ENV, PLAIN_ENV: "1"}
    proc = subprocess.run([*cmd, *args.overrides], env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise SystemExit(f"bench.py: the {name} process failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    openmp = result.pop("openmp")
    return ArmResult(**result), openmp


def _openmp(env: dict[str, str]) -> str:
    return ", ".join(f"{k}={env.get(k, 'unset')}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))


def _median(results: list[ArmResult], attr: str) -> float:
    return statistics.median(getattr(x, attr) for x in results)


def print_summary(results: dict[str, list[ArmResult]]) -> None:
    """Medians per arm, then the per-round ratios of each pair of arms that ran."""
    print("\nsummary (medians over rounds)")
    for name, rounds in results.items():
        print(
            f"  {name:5s} {_median(rounds, 'images_per_s'):8.1f} images/s, "
            f"{_median(rounds, 'cpu_ms_per_image'):.3f} CPU ms/image, test acc "
            f"{_median(rounds, 'test_acc'):.2f}% (rounds: "
            f"{', '.join(f'{x.test_acc:.2f}' for x in rounds)})"
        )
    for top, bottom in ratio_pairs(list(results)):
        pairs = list(zip(results[top], results[bottom], strict=True))
        ratios = [a.images_per_s / b.images_per_s for a, b in pairs]
        # CPU time per image does not depend on how much of the machine other jobs take.
        cpu = [b.cpu_ms_per_image / a.cpu_ms_per_image for a, b in pairs]
        print(
            f"  ratio {top}/{bottom}: median {statistics.median(ratios):.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); CPU time per image "
            f"{bottom}/{top} median {statistics.median(cpu):.2f}x"
        )


def main() -> None:
    args = parse_args()
    cfg = compose_cfg(args.overrides)
    if args.child:
        run_child(args, cfg)
        return
    threads = set_threads(cfg.get("threads"))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, "
        f"torch {torch.__version__}, {threads} threads, load average {_load_average()}"
    )
    if args.isolate:
        print(
            f"isolated processes: auto and plain {_openmp(dict(os.environ))}; "
            f"loop {_openmp(GIVEN_ENV)} (unset: libgomp's spinning waits)"
        )
    else:
        print(f"one process, every arm: {_openmp(dict(os.environ))}")
    print(
        f"config: device={device} model={cfg.model.name} batch_size={cfg.batch_size} "
        f"epochs={cfg.epochs} "
        f"augment={cfg.augment.name} optim={cfg.optim.name} lr={cfg.lr} sched={cfg.sched.name} "
        f"precision={cfg.precision} ({precision.name}) compile={cfg.compile} "
        f"speed={cfg.speed.name}" + (f" max_steps={args.max_steps}" if args.max_steps else "")
    )
    splits = None
    if not args.isolate:
        t = time.perf_counter()
        splits = load_splits(cfg.data)
        print(
            f"data: {len(splits.train)} train / {len(splits.test)} test images "
            f"({time.perf_counter() - t:.1f} s)",
            flush=True,
        )

    results: dict[str, list[ArmResult]] = {name: [] for name in args.arms}
    for r in range(args.repeats):
        seed = cfg.seed + r
        for name in args.arms[r % len(args.arms) :] + args.arms[: r % len(args.arms)]:
            openmp = ""
            if splits is None:
                res, openmp = run_isolated(name, seed, args)
                openmp = f" [{openmp}]"
            else:
                res = arm(name)(cfg, splits, seed, args.max_steps)
            results[name].append(res)
            print(
                f"round {r + 1} seed {seed} {name:5s}: {res.images_per_s:8.1f} images/s "
                f"(epochs: {', '.join(f'{x:.0f}' for x in res.epoch_rates)}), "
                f"{res.cpu_ms_per_image:.3f} CPU ms/image, "
                f"train loss {res.train_loss:.4f}, test acc {res.test_acc:.2f}%  "
                f"[load {_load_average()}]{openmp}",
                flush=True,
            )
    print_summary(results)

    if args.flops:
        fwd, train = flops_per_image(cfg)
        # 2048 is past the CPU's knee; a GPU needs larger products to fill its units.
        n = 8192 if device.type == "cuda" else 2048
        ceilings = {
            name: matmul_ceiling(dt, device, n)
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        print(
            f"\nFLOPs per image: forward {fwd / 1e6:.2f} M, training (forward + backward) "
            f"{train / 1e6:.2f} M ({train / fwd:.2f}x forward)"
        )
        print(
            f"matmul ceiling ({n} x {n}, best of 10): "
            + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceilings.items())
        )
        ours_kind = precision.name if precision.name != "fp16" else "fp32"
        for name, rounds in results.items():
            kind = "fp32" if name == "loop" else ours_kind
            achieved = _median(rounds, "images_per_s") * train
            print(
                f"  {name:5s} achieved {achieved / 1e9:7.1f} GFLOP/s = "
                f"{100 * achieved / ceilings[kind]:.1f}% of the {kind} matmul ceiling"
            )


if __name__ == "__main__":
    main()
