"""Where a training step's time goes: wall time per step against the device's kernel time.

For one config (cifar-run overrides), trains epochs of --steps steps on random uint8 images
through cifar-run's own pieces (DeviceLoader, the config's augmentation, speed settings and
optimizer, train_one_epoch): two warm-up epochs, three timed (the median reported), then
one under torch.profiler. On CUDA the profiler sums the kernels' time, so

    GPU busy = kernel time / wall time

tells launch-bound steps (host Python and kernel launches the limit: raise the batch size,
or fewer, larger kernels) from compute-bound ones, and the costliest kernels are listed.
On the CPU it lists the costliest operators instead.

    python scripts/profile_step.py experiment=fast
    python scripts/profile_step.py model=resnet18 augment=standard batch_size=128
"""

from __future__ import annotations

import argparse
import statistics

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.data.augment import build_augment  # noqa: E402
from cifar_run.data.loader import DeviceLoader  # noqa: E402
from cifar_run.data.sources import ArraySplit  # noqa: E402
from cifar_run.engine.loop import train_one_epoch  # noqa: E402
from cifar_run.engine.optim import build_optimizer  # noqa: E402
from cifar_run.errors import UserError  # noqa: E402
from cifar_run.models import build_model  # noqa: E402
from cifar_run.run import resolve_device  # noqa: E402
from cifar_run.speed.settings import SpeedSettings  # noqa: E402
from cifar_run.speed.setup import speed_setup  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run overrides")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch (default 100)")
    parser.add_argument("--top", type=int, default=6, help="costliest kernels listed (default 6)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = compose_config(args.overrides)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    speed = speed_setup(
        model, device, cfg.precision, cfg.compile, SpeedSettings.from_config(cfg.speed)
    )
    n = cfg.batch_size * args.steps
    # Random pixels: the step's cost does not depend on what the images show.
    split = ArraySplit(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))
    )
    loader = DeviceLoader(
        split,
        cfg.batch_size,
        device=device,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        shuffle=True,
        augment=build_augment(cfg.augment),
        memory_format=speed.memory_format,
    )
    criterion = torch.nn.CrossEntropyLoss()

    def epoch() -> float:
        stats = train_one_epoch(
            speed.net,
            loader,
            optimizer,
            criterion,
            device=device,
            autocast=speed.precision.dtype,
            scaler=speed.scaler,
            steps=speed,
        )
        return stats.seconds  # ends in a host synchronisation (the epoch's loss is read)

    epoch(), epoch()
    wall = statistics.median(epoch() for _ in range(3)) / args.steps
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        epoch()
    events = prof.key_averages()
    print(
        f"device={device} model={cfg.model.name} batch_size={cfg.batch_size} "
        f"precision={speed.precision.name} compile={cfg.compile}: wall {1e3 * wall:.2f} ms/step, "
        f"{cfg.batch_size / wall:.0f} images/s"
    )
    if cuda:
        busy = sum(e.self_device_time_total for e in events) / 1e6 / args.steps
        kernels = sum(e.count for e in events if e.self_device_time_total > 0) / args.steps
        print(
            f"GPU kernels {1e3 * busy:.2f} ms/step ({kernels:.0f} kernels per step): "
            f"GPU busy {100 * busy / wall:.1f}% of the wall time"
        )
    cost = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    for e in sorted(events, key=cost, reverse=True)[: args.top]:
        print(
            f"  {cost(e) / 1e3 / args.steps:7.3f} ms/step  {e.count / args.steps:5.1f}x  "
            f"{e.key[:80]}"
        )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"profile_step.py: {exc}") from None
