"""Config validation: every top-level and data key has a type and a range, checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_run.config.checks import validate
from cifar_run.config.values import MAX_SEED
from cifar_run.errors import UserError
from cifar_run.run import run

from .conftest import TEST_DATA, TINY, compose_cfg, one_line, run_cli, run_code

BAD_VALUES = [
    # (override, what the one-line message must contain)
    ("batch_size=0", "batch_size=0"),
    ("batch_size=1.5", "batch_size=1.5"),
    ("batch_size=true", "batch_size=True"),
    ("lr=abc", "lr=abc"),
    ("lr=inf", "lr=inf"),
    ("lr=nan", "lr=nan"),
    ("epochs=2.5", "epochs=2.5"),
    ("epochs=-1", "epochs=-1"),
    ("seed=abc", "seed=abc"),
    (f"seed={MAX_SEED + 1}", f"seed={MAX_SEED + 1}"),
    ("device=cuda:x", "device=cuda:x"),
    ("dry_run=maybe", "dry_run=maybe"),
    ("resume=1", "resume=1"),
    ("keep_state=sometimes", "keep_state=sometimes"),
    ("deterministic=yes", "deterministic=yes"),
    ("data.name=mnist", "data.name=mnist"),
    ("data.download=maybe", "data.download=maybe"),
    ("data.val_size=-1", "data.val_size=-1"),
    ("data.val_size=1.5", "data.val_size=1.5"),
    ("data.val_size=abc", "data.val_size=abc"),
    ("data.val_size=300", "data.val_size=300"),  # tests/data holds 300 training images
    ("data.subset=-1", "data.subset=-1"),
    ("data.subset=abc", "data.subset=abc"),
    ("data.split_seed=-1", "data.split_seed=-1"),
    ("data.cache_dir=5", "data.cache_dir=5"),
    (f"data.root={TEST_DATA / 'train'}", "no 'train' folder"),
    ("~seed", "seed: missing"),
    ("tta=crop", "tta=crop: unknown; allowed: none, flip"),
]


@pytest.mark.parametrize(("override", "named"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_line_naming_it(override: str, named: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, override]))
    message = str(info.value)
    assert named in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["augment=standard", "augment.padding_mode=edge"], "augment.padding_mode=edge: unknown"),
        (
            ["augment=cutout", "augment.padding_mode=reflect", "augment.padding=32"],
            "augment.padding=32: reflect padding must be less than the image side",
        ),
    ],
)
def test_bad_padding_is_one_line_naming_it(overrides: list[str], named: str) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg([*TINY, *overrides]))
    assert named in str(info.value) and "\n" not in str(info.value)
    validate(compose_cfg([*TINY, *overrides[:1], "augment.padding_mode=reflect"]))


def test_cifar10_val_size_is_bounded_by_its_50000_training_images() -> None:
    with pytest.raises(UserError, match=r"data.val_size=50000: must be a count in \[0, 50000\)"):
        validate(compose_cfg(["data.val_size=50000"]))
    validate(compose_cfg(["data.val_size=49999"]))


def test_a_required_value_left_unset_is_named() -> None:
    with pytest.raises(UserError, match=r"^data.root=\?\?\?: no value given"):
        validate(compose_cfg(["data=imagefolder"]))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.val_size=0", "data.subset=1"],
        ["data.val_size=0.5", f"seed={MAX_SEED}", "device=auto", "deterministic=true"],
        ["data.val_size=299", "resume=true", "data.cache_dir=null", "lr=1e30"],
    ],
)
def test_good_values_pass(overrides: list[str]) -> None:
    validate(compose_cfg([*TINY, *overrides]))


def test_validation_happens_before_any_data_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr("cifar_run.data.sources.load_data", load_data)
    with pytest.raises(UserError, match="data.subset=0"):
        run(compose_cfg([*TINY, "data.subset=0"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written at all


CLI_STRUCTURE = [
    ("+foo=1", "unknown key 'foo'"),
    ("+data.rot=x", "did you mean data.root?"),
    ("data=imagefolder", "data.root"),  # the ??? left by replacing TINY's data group
]


@pytest.mark.parametrize(("override", "named"), CLI_STRUCTURE, ids=[c[0] for c in CLI_STRUCTURE])
def test_structural_mistakes_through_the_cli(tmp_path: Path, override: str, named: str) -> None:
    args = [*TINY, override] if override != "data=imagefolder" else [override, "epochs=1"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert named in one_line(proc.stderr) and "Traceback" not in proc.stdout
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("bad", ["prune=1", "lr=-1", "optim.momentum=2"])
def test_bad_input_fails_before_torch_is_imported(bad: str, tmp_path: Path) -> None:
    # The checks run before the ~3 s import of torch, so a mistake is reported at once,
    # also with an image folder (whose train images are counted for the split sizes).
    code = (
        "import sys\n"
        "from cifar_run.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    args = ["data=imagefolder", f"data.root={TEST_DATA}", "data.val_size=0.1", bad]
    proc = run_code(code, *args, cwd=tmp_path)
    assert proc.stdout == "exit 2 False\n", proc.stderr
    assert proc.stderr.startswith(f"cifar-run: error: {bad}"), proc.stderr
