"""Optimizers and schedules: learning-rate traces against torch's own schedulers, bad values."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.image
import pytest
import torch
from omegaconf import DictConfig
from torch.optim import lr_scheduler as S

from cifar_run.config.checks import validate
from cifar_run.config.compose import CONF_DIR
from cifar_run.engine.optim import build_optimizer, build_scheduler
from cifar_run.errors import UserError
from cifar_run.run import run

from .conftest import TINY, compose_cfg, one_line, run_cli

LR = 0.1
EPOCHS = 6
STEPS = 3  # batches per epoch


def _optimizer(cfg: DictConfig | None = None) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2))]
    if cfg is None:
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    return build_optimizer(cfg.optim, params, cfg.lr)


def _losses(epochs: int = EPOCHS) -> list[float]:
    # Improves twice, then stalls: a plateau scheduler has something to react to.
    return [1.0, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6][:epochs]


def _ours(overrides: Sequence[str], epochs: int = EPOCHS) -> list[float]:
    """The lr before every batch, through build_scheduler and the Schedule's hooks."""
    cfg = compose_cfg([*TINY, f"lr={LR}", f"epochs={epochs}", *overrides])
    validate(cfg)
    opt = _optimizer(cfg)
    schedule = build_scheduler(cfg.sched, opt, epochs=epochs, steps_per_epoch=STEPS)
    trace = []
    for epoch in range(epochs):
        for _ in range(STEPS):
            trace.append(opt.param_groups[0]["lr"])
            opt.step()
            if schedule.step_batch is not None:
                schedule.step_batch()
        loss = _losses(epochs)[epoch]
        schedule.step_epoch({"val_loss": loss, "val_acc": 100 * (1 - loss)})
    return trace


def _torch(
    make: Callable[[torch.optim.Optimizer], object] | None,
    per_step: bool,
    metric: Callable[[int], float] | None = None,
    epochs: int = EPOCHS,
) -> list[float]:
    """The same trace from a torch scheduler built by hand."""
    opt = _optimizer()
    sched = make(opt) if make is not None else None
    trace = []
    for epoch in range(epochs):
        for _ in range(STEPS):
            trace.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None and per_step:
                sched.step()
        if sched is not None and not per_step:
            sched.step(metric(epoch)) if metric is not None else sched.step()
    return trace


def _warm(main: Callable[[torch.optim.Optimizer], object], iters: int, factor: float = 0.1):
    def make(opt: torch.optim.Optimizer) -> object:
        warmup = S.LinearLR(opt, start_factor=factor, end_factor=1.0, total_iters=iters)
        return S.SequentialLR(opt, [warmup, main(opt)], milestones=[iters])

    return make


N = EPOCHS * STEPS
CASES = {
    "none": (["sched=none"], None, False),
    "step": (
        ["sched=step", "sched.step_size=2", "sched.gamma=0.5"],
        lambda o: S.StepLR(o, step_size=2, gamma=0.5),
        False,
    ),
    "multistep": (
        ["sched=multistep", "sched.milestones=[2,5]", "sched.gamma=0.1"],
        lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
        False,
    ),
    "cosine": (["sched=cosine"], lambda o: S.CosineAnnealingLR(o, T_max=EPOCHS), False),
    "cosine-per-step": (
        ["sched=cosine", "sched.interval=step", "sched.eta_min=0.001"],
        lambda o: S.CosineAnnealingLR(o, T_max=N, eta_min=0.001),
        True,
    ),
    "onecycle": (["sched=onecycle"], lambda o: S.OneCycleLR(o, max_lr=LR, total_steps=N), True),
    "none-warmup": (
        ["sched=none", "sched.warmup_epochs=2"],
        lambda o: S.LinearLR(o, start_factor=0.1, total_iters=2),
        False,
    ),
    "step-warmup": (
        ["sched=step", "sched.step_size=2", "sched.warmup_epochs=1"],
        _warm(lambda o: S.StepLR(o, step_size=2, gamma=0.1), 1),
        False,
    ),
    "cosine-warmup": (
        ["sched=cosine", "sched.warmup_epochs=2", "sched.warmup_start_factor=0.25"],
        _warm(lambda o: S.CosineAnnealingLR(o, T_max=EPOCHS - 2), 2, 0.25),
        False,
    ),
    "cosine-per-step-warmup": (
        ["sched=cosine", "sched.interval=step", "sched.warmup_epochs=1"],
        _warm(lambda o: S.CosineAnnealingLR(o, T_max=N - STEPS), STEPS),
        True,
    ),
    "onecycle-warmup": (
        ["sched=onecycle", "sched.warmup_epochs=1", "sched.pct_start=0.5"],
        _warm(lambda o: S.OneCycleLR(o, max_lr=LR, total_steps=N - STEPS, pct_start=0.5), STEPS),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_torch_built_by_hand(case: str) -> None:
    overrides, make, per_step = CASES[case]
    ours = _ours(overrides)
    assert ours == pytest.approx(_torch(make, per_step), rel=1e-9, abs=1e-12)
    if make is not None:
        assert len(set(ours)) > 1  # the trace really moves


def test_every_schedule_file_is_covered() -> None:
    names = {p.stem for p in (CONF_DIR / "sched").glob("*.yaml")}
    assert names == {c.split("-")[0] for c in CASES} | {"plateau"}


def test_per_epoch_schedules_hold_the_lr_within_an_epoch() -> None:
    trace = _ours(["sched=cosine"])
    assert all(len(set(trace[e * STEPS : (e + 1) * STEPS])) == 1 for e in range(EPOCHS))
    per_step = _ours(["sched=cosine", "sched.interval=step"])
    assert len(set(per_step[:STEPS])) == STEPS


def test_warmup_rises_linearly_to_lr() -> None:
    epochs = [_ours(["sched=none", "sched.warmup_epochs=2"])[e * STEPS] for e in range(EPOCHS)]
    assert epochs == pytest.approx([0.1 * LR, 0.55 * LR, LR, LR, LR, LR])
    steps = _ours(["sched=cosine", "sched.interval=step", "sched.warmup_epochs=2"])
    warm = 2 * STEPS
    expected = [LR * (0.1 + 0.9 * i / warm) for i in range(warm)]
    assert steps[:warm] == pytest.approx(expected)
    assert steps[warm] == pytest.approx(LR) and steps[-1] < 0.1 * LR  # then the cosine decay


def _plateau(monitor: str, warmup: int = 0) -> tuple[list[float], list[float]]:
    overrides = [
        "sched=plateau",
        f"sched.monitor={monitor}",
        "sched.patience=1",
        "sched.factor=0.5",
        f"sched.warmup_epochs={warmup}",
    ]
    ours = _ours(overrides)

    def metric(epoch: int) -> float:
        loss = _losses()[epoch]
        return loss if monitor == "val_loss" else 100 * (1 - loss)

    def make(opt: torch.optim.Optimizer) -> object:
        mode = "min" if monitor == "val_loss" else "max"
        return S.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=1)

    if not warmup:
        return ours, _torch(make, False, metric)
    # By hand: LinearLR for the warmup epochs, then the plateau scheduler on the metric.
    opt = _optimizer()
    warm = S.LinearLR(opt, start_factor=0.1, total_iters=warmup)
    plateau = make(opt)
    theirs = []
    for epoch in range(EPOCHS):
        theirs += [opt.param_groups[0]["lr"]] * STEPS
        opt.step()
        warm.step() if epoch < warmup else plateau.step(metric(epoch))
    return ours, theirs


@pytest.mark.parametrize("monitor", ["val_loss", "val_acc"])
def test_plateau_reacts_to_the_monitored_metric(monitor: str) -> None:
    ours, theirs = _plateau(monitor)
    assert ours == pytest.approx(theirs)
    per_epoch = ours[::STEPS]
    # Improving keeps the lr; two epochs without improvement (more than patience 1) halve it.
    # With the wrong mode (min on accuracy) the lr would drop after the second epoch.
    assert per_epoch == pytest.approx([LR] * 5 + [LR / 2])


def test_plateau_after_warmup() -> None:
    ours, theirs = _plateau("val_loss", warmup=2)
    assert ours == pytest.approx(theirs)
    assert ours[0] == pytest.approx(0.1 * LR) and ours[2 * STEPS] == pytest.approx(LR)
    assert ours[-1] < LR


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_and_looped_optimizers_take_the_same_steps(name: str) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    runs = {}
    for fused in (True, False):
        cfg = compose_cfg([f"optim={name}", "optim.weight_decay=0.01", f"optim.fused={fused}"])
        if name == "sgd":
            cfg.optim.nesterov = True
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = build_optimizer(cfg.optim, params, 0.05)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[fused] = params
    for a, b, w in zip(runs[True], runs[False], weights, strict=True):
        assert not torch.equal(a, w)  # the steps moved the weights...
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # ...the same way


def test_optimizers_take_the_top_level_lr_and_their_keys() -> None:
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        cfg = compose_cfg([f"optim={name}", "lr=0.003", "optim.weight_decay=0.001"])
        opt = _optimizer(cfg)
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.003
        assert opt.param_groups[0]["weight_decay"] == 0.001
    cfg = compose_cfg(["optim=adamw", "optim.betas=[0.8,0.99]"])
    opt = _optimizer(cfg)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.8, 0.99)
    for name in ("sgd", "adam", "adamw"):  # one fused kernel per step unless fused=false
        assert _optimizer(compose_cfg([f"optim={name}"])).defaults["fused"] is True
        assert not _optimizer(compose_cfg([f"optim={name}", "optim.fused=false"])).defaults["fused"]
    cfg = compose_cfg(["optim=sgd", "optim.nesterov=true", "optim.momentum=0.5"])
    group = _optimizer(cfg).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.5


BAD = [
    (["augment=standard", "augment.flip=1.5"], "augment.flip=1.5"),
    (["augment=standard", "augment.flip=-0.1"], "augment.flip=-0.1"),
    (["augment=standard", "augment.padding=-1"], "augment.padding=-1"),
    (["augment=rotate", "augment.degrees=-5"], "augment.degrees=-5"),
    (["augment=cutout", "augment.size=0"], "augment.size=0"),
    (["augment=cutout", "augment.size=33"], "augment.size=33"),
    (["augment=resized_crop", "augment.scale=[0.9,0.5]"], "augment.scale=[0.9, 0.5]"),
    (["augment=resized_crop", "augment.scale=[0,1]"], "augment.scale=[0, 1]"),
    (["augment=resized_crop", "augment.ratio=[1.2,1.1]"], "augment.ratio=[1.2, 1.1]"),
    (["augment=autoaugment", "augment.policy=mnist"], "augment.policy=mnist"),
    (["augment=trivialaugment", "augment.num_magnitude_bins=1"], "augment.num_magnitude_bins=1"),
    (["augment.normalize=imagenette"], "augment.normalize=imagenette"),
    (["optim.momentum=1.5"], "optim.momentum=1.5"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1"),
    (["optim.momentum=0", "optim.nesterov=true"], "optim.nesterov=true"),
    (["optim=adam", "optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]"),
    (["optim=adamw", "optim.label_smoothing=1.0"], "optim.label_smoothing=1.0"),
    (["optim.fused=yes"], "optim.fused=yes"),
    (["optim.grad_clip=0"], "optim.grad_clip=0"),
    (["optim.decay_norm_and_bias=maybe"], "optim.decay_norm_and_bias=maybe"),
    (["optim=adam", "optim.grad_clip=-1"], "optim.grad_clip=-1"),
    (["epochs=3", "sched.warmup_epochs=3"], "sched.warmup_epochs=3"),
    (["sched=none", "sched.warmup_epochs=-1"], "sched.warmup_epochs=-1"),
    (["sched.warmup_start_factor=0"], "sched.warmup_start_factor=0"),
    (["sched.interval=batch"], "sched.interval=batch"),
    (["epochs=10", "sched=multistep", "sched.milestones=[0,5]"], "sched.milestones=[0, 5]"),
    (["epochs=10", "sched=multistep", "sched.milestones=[11]"], "sched.milestones=[11]"),
    (["epochs=10", "sched=multistep", "sched.milestones=[8]", "sched.warmup_epochs=3"], "[8]"),
    (["sched=step", "sched.step_size=0"], "sched.step_size=0"),
    (["sched=step", "sched.interval=step"], "sched.interval=step"),
    (["sched=plateau", "sched.factor=1.0"], "sched.factor=1.0"),
    (["sched=plateau", "sched.factor=0"], "sched.factor=0"),
    (["sched=plateau", "sched.patience=-1"], "sched.patience=-1"),
    (["sched=plateau", "sched.monitor=train_loss"], "sched.monitor=train_loss"),
    (["sched=plateau", "sched.threshold_mode=max"], "sched.threshold_mode=max"),
    (["sched=plateau", "data.val_size=0"], "sched=plateau"),
    (["sched=onecycle", "sched.pct_start=1.5"], "sched.pct_start=1.5"),
    (["sched=cosine", "sched.T_max=0"], "sched.T_max=0"),
    (["preview=maybe"], "preview=maybe"),
]


@pytest.mark.parametrize(("overrides", "named"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_one_line_errors(overrides: list[str], named: str) -> None:
    cfg = compose_cfg([*TINY, *overrides])
    with pytest.raises(UserError) as err:
        validate(cfg)
    message = str(err.value)
    assert named in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["augment=cutout", "augment.size=40"], "augment.size=40"),
        (["sched=multistep", "sched.milestones=[20]"], "sched.milestones=[20]"),
    ],
)
def test_bad_values_through_the_cli(tmp_path: Path, overrides: list[str], named: str) -> None:
    proc = run_cli(*TINY, *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert named in one_line(proc.stderr)
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("*.pt"))


SCHEDS = sorted(p.stem for p in (CONF_DIR / "sched").glob("*.yaml"))


@pytest.mark.parametrize("sched", SCHEDS)
def test_every_schedule_trains_and_logs_the_lr_of_every_epoch(tmp_path: Path, sched: str) -> None:
    overrides = [*TINY, "data.subset=4", "epochs=3", f"sched={sched}", "lr=0.05"]
    overrides += {"multistep": ["sched.milestones=[1]"], "step": ["sched.step_size=1"]}.get(
        sched, ["sched.warmup_epochs=1"]
    )
    results = run(compose_cfg(overrides), tmp_path)
    assert results["status"] == "completed" and results["sched"] == sched
    with open(tmp_path / "metrics.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert len(lrs) == 3
    if sched in ("multistep", "step"):
        assert lrs == pytest.approx([0.05, 0.005, 0.005 if sched == "multistep" else 0.0005])
    elif sched != "onecycle":  # onecycle starts at max_lr / div_factor
        assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.05)  # warmup


def test_report_003_recipe_runs_through_the_cli(tmp_path: Path) -> None:
    # Report 003 with LeNet-5 standing in for ResNet-32, on the tiny subset.
    recipe = [
        "model=lenet5",
        "augment=resized_crop",
        "augment.normalize=dataset",
        "optim=sgd",
        "lr=0.1",
        "optim.weight_decay=1e-4",
        "sched=plateau",
    ]
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, *recipe, "epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["augment"] == "resized_crop"
    assert results["sched"] == "plateau" and results["lr"] == 0.1
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and all(float(line.split(",")[5]) == 0.1 for line in lines[1:])


def test_preview_writes_the_grid_and_does_not_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY, "augment=rotate", "preview=true", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    png = run_dir / "augment_preview.png"
    assert str(png) in proc.stdout
    grid = matplotlib.image.imread(png)
    # 8 rows of an original and 3 draws, 32 pixels plus 2 of padding each, zoomed 4x.
    assert grid.shape[:2] == (4 * (2 + 8 * 34), 4 * (2 + 4 * 34))
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "results.json").exists()


def test_grad_clip_reaches_training(tmp_path: Path) -> None:
    # Plain SGD without weight decay, every step's gradient clipped to a norm of 1e-9: the
    # run's weights end where they started, and without the clip they do not.
    from cifar_run.models import build_model
    from cifar_run.run import seed_everything

    base = [*TINY, "optim.momentum=0", "optim.weight_decay=0", "lr=1.0"]
    cfg = compose_cfg(base)
    seed_everything(cfg.seed)
    start = build_model(cfg.model).state_dict()

    def moved(extra: list[str], name: str) -> float:
        run(compose_cfg([*base, *extra]), tmp_path / name)
        end = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        return max(float((end[k] - start[k]).abs().max()) for k in start)

    assert moved(["optim.grad_clip=1e-9"], "clipped") < 1e-7
    assert moved([], "free") > 1e-3


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_decay_norm_and_bias_false_spares_the_one_dimensional_tensors(optim: str) -> None:
    # With zero gradients a step is weight decay alone: matrices and kernels shrink, biases
    # and BatchNorm weights stay where they are (and all of them shrink by default).
    from cifar_run.models import build_model

    def step(exempt: bool) -> dict[str, bool]:
        cfg = compose_cfg([f"optim={optim}", "optim.weight_decay=0.1", "model=resnet20"])
        if exempt:
            cfg.optim.decay_norm_and_bias = False
        model = build_model(cfg.model)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
                p.grad = torch.zeros_like(p)
        build_optimizer(cfg.optim, model.parameters(), lr=0.5).step()
        return {name: bool((p < 1).all()) for name, p in model.named_parameters()}

    shrunk = step(exempt=True)
    ndim = {
        n: p.ndim for n, p in build_model(compose_cfg(["model=resnet20"]).model).named_parameters()
    }
    assert {n for n, s in shrunk.items() if s} == {n for n, d in ndim.items() if d > 1}
    assert all(step(exempt=False).values())
