"""How far bf16 training strays from fp32: gradients along a training run, and test accuracy.

For a config given as cifar-run overrides, the script trains the model in fp32 (the
config's optimizer, lr and augmentation, no schedule) and at each of --at steps compares,
on one fixed training batch:

  bf16       the gradient under bf16 autocast as cifar-run trains (channels_last batches,
             conv_grad's convolutions on the CPU)
             against the fp32 gradient of the same weights and batch: relative error
             |g_bf16 - g_fp32| / |g_fp32| and cosine
  per layer  the layers with the largest relative error
  batch      for scale, the fp32 gradient of another batch against the first: the
             minibatch noise that SGD already lives with

After the last step it evaluates the test set with the same weights in fp32 and under
bf16 autocast (accuracy and loss of each, and how many predictions differ).

A bf16 error far below the minibatch noise means bf16 arithmetic adds little to what SGD
already tolerates; an error near it would be a reason to train in fp32.

Example (the figures in docs/benchmarks.md):

    PYTHONPATH=src python scripts/precision_check.py model=resnet18 augment=standard \\
        batch_size=128 data=imagefolder data.root=../shared/data/cifar10-jpeg --at 0 50 200
"""

from __future__ import annotations

import argparse
import copy
import itertools

from cifar_run.constants import set_openmp_defaults  # torch-free

set_openmp_defaults()  # as cifar-run does, before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cifar_run.config.checks import validate  # noqa: E402
from cifar_run.config.compose import compose_config  # noqa: E402
from cifar_run.data.augment import build_augment, normalization  # noqa: E402
from cifar_run.data.loader import DeviceLoader  # noqa: E402
from cifar_run.data.sources import load_splits  # noqa: E402
from cifar_run.engine.optim import build_optimizer  # noqa: E402
from cifar_run.errors import UserError  # noqa: E402
from cifar_run.models import build_model  # noqa: E402
from cifar_run.run import EVAL_BATCH_SIZE, seed_everything  # noqa: E402
from cifar_run.speed.setup import memory_format as memory_format_for  # noqa: E402
from cifar_run.speed.setup import tap_conv_grads  # noqa: E402
from cifar_run.speed.threads import set_threads  # noqa: E402

CPU = torch.device("cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="cifar-run overrides, e.g. model=resnet18")
    parser.add_argument(
        "--at", type=int, nargs="+", default=[0, 50, 200], help="training steps to compare at"
    )
    parser.add_argument("--worst", type=int, default=3, help="layers listed per step")
    return parser.parse_args()


def as_trained_in_bf16(net: nn.Module) -> nn.Module:
    """`net` (in place) with the layers cifar-run swaps in for bf16 on the CPU: conv_grad's
    convolutions."""
    tap_conv_grads(net, CPU)
    return net


def gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool
) -> dict[str, torch.Tensor]:
    """Training-mode gradients of a copy of `model` (its weights and BatchNorm statistics
    stay as they are); under bf16 the copy runs with cifar-run's CPU layers."""
    net = copy.deepcopy(model).train()
    if bf16:
        as_trained_in_bf16(net)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        F.cross_entropy(net(x), y).backward()
    return {name: p.grad.detach().float() for name, p in net.named_parameters()}


def compare(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    va = torch.cat([g.flatten() for g in a.values()]).double()
    vr = torch.cat([g.flatten() for g in ref.values()]).double()
    return float((va - vr).norm() / vr.norm()), float(F.cosine_similarity(va, vr, dim=0))


@torch.no_grad()
def predictions(model: nn.Module, batches: DeviceLoader, bf16: bool) -> torch.Tensor:
    if bf16:
        model = as_trained_in_bf16(copy.deepcopy(model))
    model.eval()
    out = []
    for x, _ in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float())
    return torch.cat(out)


def main() -> None:
    args = parse_args()
    cfg = compose_config(["device=cpu", *args.overrides])
    try:
        validate(cfg)
        splits = load_splits(cfg.data)
    except UserError as exc:
        raise SystemExit(f"precision_check.py: {exc}") from None
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    memory_format = memory_format_for(model, CPU)
    mean, std = normalization(cfg.augment.normalize, splits.train.images)
    norm = {"device": CPU, "mean": mean, "std": std, "memory_format": memory_format}
    train = DeviceLoader(
        splits.train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        augment=build_augment(cfg.augment),
        **norm,
    )
    batches = itertools.cycle(train)  # endless: --at may pass an epoch
    probe, other = next(batches), next(batches)
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.lr)
    print(
        f"config: model={cfg.model.name} batch_size={cfg.batch_size} "
        f"optim={cfg.optim.name} lr={cfg.lr}"
    )

    step = 0
    for target in sorted(args.at):
        model.train()
        for x, y in itertools.islice(batches, target - step):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        step = max(step, target)
        fp32 = gradients(model, *probe, bf16=False)
        bf16 = gradients(model, *probe, bf16=True)
        rel, cos = compare(bf16, fp32)
        noise, noise_cos = compare(gradients(model, *other, bf16=False), fp32)
        print(
            f"step {step:5d}: bf16 vs fp32 gradient: relative error {rel:.3f}, cosine {cos:.4f}; "
            f"another batch in fp32: {noise:.3f}, cosine {noise_cos:.4f}"
        )
        worst = sorted(
            ((float((bf16[k] - g).norm() / g.norm()), k) for k, g in fp32.items() if g.norm() > 0),
            reverse=True,
        )
        for err, name in worst[: args.worst]:
            print(f"             {name}: {err:.3f}")

    test = DeviceLoader(splits.test, EVAL_BATCH_SIZE, **norm)
    labels = splits.test.labels
    logits = {bf: predictions(model, test, bf) for bf in (False, True)}
    for bf, out in logits.items():
        loss = F.cross_entropy(out, labels).item()
        acc = 100.0 * (out.argmax(1) == labels).float().mean().item()
        print(
            f"test after {step} fp32 steps, evaluated in {'bf16' if bf else 'fp32'}: "
            f"acc {acc:.2f}%, loss {loss:.4f}"
        )
    differ = (logits[False].argmax(1) != logits[True].argmax(1)).sum().item()
    print(f"predictions that differ between the two: {differ} of {len(labels)}")


if __name__ == "__main__":
    main()
