"""Speed settings keep the numbers: precision, channels_last batches, compile, threads.

Nothing here times anything (speed figures live in docs/benchmarks.md, from
scripts/bench.py); these tests check that the fast paths compute what the plain ones do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from cifar_run.config.checks import validate
from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD
from cifar_run.data import sources as data
from cifar_run.data.loader import DeviceLoader
from cifar_run.engine.loop import evaluate, train_one_epoch
from cifar_run.engine.precision import resolve_precision
from cifar_run.errors import UserError
from cifar_run.models import build_model
from cifar_run.models.lenet import LeNet5
from cifar_run.run import run
from cifar_run.speed import setup as accel
from cifar_run.speed import threads as cores

from .conftest import TEST_DATA, TINY, compose_cfg, run_script

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> data.ArraySplit:
    """The committed training images (300 real CIFAR-10 JPEGs, 30 per class)."""
    train, _, _ = data.load_imagefolder(TEST_DATA)
    return train


def _train_losses(split: data.ArraySplit, autocast: torch.dtype | None, epochs: int) -> list:
    torch.manual_seed(0)
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = DeviceLoader(
        split, 32, device=CPU, mean=CIFAR10_MEAN, std=CIFAR10_STD, shuffle=True, seed=0
    )
    loss = nn.CrossEntropyLoss()
    return [
        train_one_epoch(model, batches, optimizer, loss, device=CPU, autocast=autocast).loss
        for _ in range(epochs)
    ]


def test_fp32_and_bf16_runs_of_one_seed_reach_similar_loss(tiny: data.ArraySplit) -> None:
    fp32 = _train_losses(tiny, None, epochs=8)
    bf16 = _train_losses(tiny, torch.bfloat16, epochs=8)
    assert fp32[-1] < fp32[0] - 0.3  # both actually learned something...
    assert bf16[-1] < bf16[0] - 0.3
    assert abs(fp32[-1] - bf16[-1]) < 0.1 * fp32[-1]  # ...and about the same
    assert fp32 != bf16  # bf16 really ran: its rounding moves the numbers a little


def test_fp16_with_grad_scaler_trains(tiny: data.ArraySplit) -> None:
    torch.manual_seed(0)
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precision = resolve_precision("fp16", CPU)
    scaler = precision.scaler(CPU)
    assert precision.dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    batches = DeviceLoader(
        tiny, 32, device=CPU, mean=CIFAR10_MEAN, std=CIFAR10_STD, shuffle=True, seed=0
    )
    loss = nn.CrossEntropyLoss()
    stats = [
        train_one_epoch(
            model, batches, optimizer, loss, device=CPU, autocast=torch.float16, scaler=scaler
        )
        for _ in range(4)
    ]
    # The scaler skips the first steps while it finds a scale that does not overflow.
    assert stats[-1].loss < stats[0].loss - 0.1
    assert scaler.get_scale() > 1  # the loss really was scaled


def test_evaluate_under_autocast_matches_fp32(tiny: data.ArraySplit) -> None:
    torch.manual_seed(0)
    model = LeNet5()
    batches = DeviceLoader(tiny, 100, device=CPU, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    fp32 = evaluate(model, batches, nn.CrossEntropyLoss(), device=CPU)
    bf16 = evaluate(model, batches, nn.CrossEntropyLoss(), device=CPU, autocast=torch.bfloat16)
    assert abs(fp32.loss - bf16.loss) < 0.01 and bf16.images == fp32.images == 300


# ---------------------------------------------------------------------------------------------
# The device-resident pipeline against the reference one


class _PILDataset(torch.utils.data.Dataset):
    """What a torchvision-style script does: PIL image per item, ToTensor, Normalize."""

    def __init__(self, split: data.ArraySplit) -> None:
        import torchvision.transforms as T

        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels
        self.transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_device_batches_equal_the_reference_pipeline_in_order_and_content(
    tiny: data.ArraySplit, fmt: torch.memory_format
) -> None:
    ours = DeviceLoader(
        tiny,
        32,
        device=CPU,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        shuffle=True,
        seed=7,
        memory_format=fmt,
    )
    sampler = BatchSampler(
        RandomSampler(range(len(tiny)), generator=torch.Generator().manual_seed(7)), 32, False
    )
    reference = DataLoader(_PILDataset(tiny), batch_sampler=sampler)
    for _ in range(2):  # two epochs: both generators advance alike
        batches = 0
        for (x, y), (x_ref, y_ref) in zip(ours, reference, strict=True):
            assert torch.equal(y, y_ref)
            assert x.is_contiguous(memory_format=fmt)
            assert torch.allclose(x, x_ref, atol=1e-5)  # same pixels, same normalization
            batches += 1
        assert batches == len(ours) == 10


def test_channels_last_for_conv_nets_only() -> None:
    lenet = build_model(compose_cfg().model)
    resnet = build_model(compose_cfg(["model=resnet18"]).model)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    assert accel.memory_format(lenet, CPU) == torch.channels_last  # 3 and 6 channels too
    assert accel.memory_format(resnet, CPU) == torch.channels_last
    assert accel.memory_format(mlp, CPU) == torch.contiguous_format
    assert accel.memory_format(lenet, torch.device("cuda")) == torch.channels_last
    assert accel.memory_format(lenet, torch.device("mps")) == torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# The keys


@pytest.mark.parametrize(("avx512_bf16", "amx"), [(True, True), (True, False), (False, False)])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_amx(
    avx512_bf16: bool, amx: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AVX-512 BF16 without AMX trains slower in bf16 than in fp32 (docs/benchmarks.md)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    auto = resolve_precision("auto", CPU)
    assert auto.name == ("bf16" if amx else "fp32")
    assert auto.dtype == (torch.bfloat16 if amx else None)
    assert auto.scaler(CPU) is None
    assert resolve_precision("fp32", CPU).dtype is None  # explicit values stay as given
    assert resolve_precision("bf16", CPU).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("precision=bf8", "precision=bf8: unknown; allowed: auto, fp32, bf16, fp16"),
        ("precision=true", "precision=True"),
        ("compile=yes", "compile=yes: must be true or false"),
        ("threads=0", "threads=0: must be a positive integer"),
    ],
)
def test_bad_speed_keys_are_one_line_naming_them(override: str, named: str) -> None:
    with pytest.raises(UserError, match=named.replace("(", r"\(")) as info:
        validate(compose_cfg([*TINY, override]))
    assert "\n" not in str(info.value)


def test_threads_key_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert cores.set_threads(1) == 1 == torch.get_num_threads()
        assert cores.set_threads(None) == 1  # null leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_run_records_the_resolved_precision(tmp_path: Path) -> None:
    results = run(compose_cfg([*TINY, "precision=bf16"]), tmp_path / "run")
    assert results["status"] == "completed" and results["precision"] == "bf16"
    assert 0 <= results["test_acc"] <= 100


@pytest.mark.slow
def test_compile_true_trains_on_cpu_and_saves_the_plain_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run(compose_cfg([*TINY, "compile=true", "precision=fp32"]), out)
    assert results["status"] == "completed" and 0 <= results["test_acc"] <= 100
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state)  # the uncompiled module's keys
    LeNet5().load_state_dict(state)  # and it loads into a plain model
    assert all(v.is_contiguous() for v in state.values())  # plain NCHW tensors


def test_bench_script_trains_every_arm_and_reports_their_ratios(tmp_path: Path) -> None:
    # The benchmark behind docs/benchmarks.md must keep running as the code under it moves.
    proc = run_script("bench.py", "--repeats", "2", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rounds = re.findall(r"round \d seed (\d) (auto|plain|loop) *:.*test acc ([\d.]+)%", proc.stdout)
    assert sorted((seed, arm) for seed, arm, _ in rounds) == [
        (seed, arm) for seed in "01" for arm in ("auto", "loop", "plain")
    ], proc.stdout
    assert all(0.0 <= float(acc) <= 100.0 for *_, acc in rounds)
    for pair in ("auto/plain", "auto/loop", "plain/loop"):
        assert re.search(rf"ratio {pair}: median [\d.]+x", proc.stdout), proc.stdout
    assert re.search(r"^config: device=cpu model=lenet5 .* speed=auto", proc.stdout, re.M)


def test_bench_isolate_runs_each_arm_in_its_own_process_and_environment(tmp_path: Path) -> None:
    # --isolate: the loop as a user's own script runs (the environment as given), cifar-run's
    # arms as cifar-run runs (passive OpenMP waits unless the environment says otherwise).
    proc = run_script(
        "bench.py", "--isolate", "--repeats", "1", "--arms", "auto,loop", *TINY, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    given = os.environ.get("GOMP_SPINCOUNT")
    chosen = "OMP_WAIT_POLICY" in os.environ or given is not None
    for arm, spins in (("auto", given if chosen else "10000"), ("loop", given or "unset")):
        line = re.search(rf"round 1 seed 0 {arm} *:.*test acc ([\d.]+)%.*", proc.stdout)
        assert line is not None, proc.stdout
        assert 0.0 <= float(line.group(1)) <= 100.0
        assert f"GOMP_SPINCOUNT={spins}]" in line.group(0), line.group(0)
    assert re.search(r"ratio auto/loop: median [\d.]+x", proc.stdout), proc.stdout


def test_bench_script_runs_the_arms_asked_for(tmp_path: Path) -> None:
    proc = run_script("bench.py", "--repeats", "1", "--arms", "loop", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"round 1 seed 0 loop *:.*test acc [\d.]+%", proc.stdout), proc.stdout
    assert " auto " not in proc.stdout and "ratio" not in proc.stdout
    bad = run_script("bench.py", "--arms", "ours", *TINY, cwd=tmp_path)
    assert bad.returncode == 2 and "choose from auto, plain, loop" in bad.stderr


def test_plain_auto_and_one_trick_off_train_lenet5_to_the_same_loss(tmp_path: Path) -> None:
    # speed=plain, speed=auto and auto without one trick differ in speed, and in rounding only.
    arms = "auto,plain,no-conv_grads"
    proc = run_script(
        "bench.py", "--repeats", "1", "--arms", arms, *TINY, "precision=fp32", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    losses = dict(re.findall(r"seed 0 ([\w-]+) *:.*train loss ([\d.]+)", proc.stdout))
    assert sorted(losses) == sorted(arms.split(",")), proc.stdout
    assert max(map(float, losses.values())) - min(map(float, losses.values())) < 1e-3
    assert re.search(r"ratio auto/no-conv_grads: median [\d.]+x", proc.stdout), proc.stdout


def test_precision_check_compares_bf16_with_fp32(tmp_path: Path) -> None:
    proc = run_script("precision_check.py", *TINY, "--at", "0", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    errors = re.findall(r"step +(\d+): bf16 vs fp32 gradient: relative error ([\d.]+)", proc.stdout)
    assert [int(s) for s, _ in errors] == [0, 2], proc.stdout
    assert all(0.0 <= float(e) < 1.0 for _, e in errors)  # bf16 is close, not equal or lost
    accs = re.findall(r"evaluated in (fp32|bf16): acc ([\d.]+)%", proc.stdout)
    assert [a for a, _ in accs] == ["fp32", "bf16"], proc.stdout
    assert re.search(r"predictions that differ between the two: \d+ of 100", proc.stdout)


def test_step_profile_reports_wall_time_and_the_costliest_operators(tmp_path: Path) -> None:
    args = ("model=lenet5", "batch_size=8", "device=cpu", "--steps", "2", "--top", "3")
    proc = run_script("profile_step.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    wall = re.search(
        r"model=lenet5 batch_size=8 .*: wall ([\d.]+) ms/step, (\d+) images/s", proc.stdout
    )
    assert wall and float(wall.group(1)) > 0, proc.stdout
    ops = re.findall(r"^ +([\d.]+) ms/step +([\d.]+)x +(\S+)", proc.stdout, re.M)
    assert len(ops) == 3, proc.stdout  # --top 3
    assert [float(t) for t, _, _ in ops] == sorted((float(t) for t, _, _ in ops), reverse=True)


def test_loader_bench_times_both_arms_and_finds_their_batches_equal(tmp_path: Path) -> None:
    args = ("--batch-sizes", "16", "--images", "64", "--rounds", "2", "--augment", "standard")
    proc = run_script("bench_loader.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = re.search(
        r"^batch 16: plain ([\d.]+) us, DeviceLoader ([\d.]+) us per batch .*"
        r"largest difference ([\d.e+-]+)$",
        proc.stdout,
        re.M,
    )
    assert found and float(found[1]) > 0 and float(found[2]) > 0, proc.stdout
    assert float(found[3]) < 1e-5  # the same pixels and normalization, up to rounding


def test_ema_bench_times_both_updates_and_finds_them_identical(tmp_path: Path) -> None:
    args = ("--models", "lenet5", "--rounds", "2", "--calls", "3")
    proc = run_script("bench_ema.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = re.search(
        r"^lenet5 \(62,006 parameters, cpu\): AveragedModel.update_parameters ([\d.]+) ms, "
        r"ema.step_function ([\d.]+) ms per update .*identical averages: True$",
        proc.stdout,
        re.M,
    )
    assert found and float(found[1]) > 0 and float(found[2]) > 0, proc.stdout
