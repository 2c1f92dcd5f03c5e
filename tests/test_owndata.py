"""Data of one's own: any class count (the model's outputs follow it), any image size (resized
when decoded), CIFAR-100; per-class numbers recounted from the saved model."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from cifar_run.config.checks import validate
from cifar_run.config.data_keys import follow_data
from cifar_run.data import sources
from cifar_run.engine.loop import evaluate
from cifar_run.errors import UserError
from cifar_run.models import build_model, check_input

from .conftest import TEST_DATA, compose_cfg, one_line, run_cli
from .folders import add_class, copy_classes, corrupt, recount, resized_copy, results

# A tiny exact run: fp32 and no speed tricks, so a recount in plain torch sees the same argmax.
EXACT = ["data.subset=10", "data.val_size=0.1", "epochs=1", "batch_size=32", "device=cpu"]
EXACT += ["precision=fp32", "speed=plain"]
CLASSES_3 = ["airplane", "cat", "ship"]


def _folder_args(root: Path) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", *EXACT]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_classes(tmp_path_factory.mktemp("three") / "data", CLASSES_3)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10 classes plus two made from others: grey airplanes and upside-down ships."""
    root = copy_classes(tmp_path_factory.mktemp("twelve") / "data", sorted(_subset_classes()))
    add_class(
        root, "zz_grey_airplane", "airplane", lambda im: ImageOps.grayscale(im).convert("RGB")
    )
    add_class(root, "zz_upside_down_ship", "ship", ImageOps.flip)
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resized_copy(tmp_path_factory.mktemp("big") / "data", (64, 64))


def _subset_classes() -> list[str]:
    return [d.name for d in (TEST_DATA / "train").iterdir() if d.is_dir()]


def _assert_numbers_match_a_recount(run_dir: Path, classes: int) -> None:
    """results.json test_class_acc and test_acc, and confusion.csv, are what the saved best.pt
    predicts on the test split; every test image is counted once, in its own row."""
    names, rows = recount(run_dir)
    assert len(names) == classes
    res = results(run_dir)
    assert res["status"] == "completed" and res["classes"] == names
    assert res["test_class_acc"] == {
        n: pytest.approx(100.0 * rows[i][i] / sum(rows[i])) for i, n in enumerate(names)
    }
    total = sum(map(sum, rows))
    assert total == 10 * classes  # data.subset=10 test images per class, none lost
    assert res["test_acc"] == pytest.approx(100.0 * sum(rows[i][i] for i in range(classes)) / total)
    with open(run_dir / "confusion.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["true"] for r in table] == names
    assert [[int(r[n]) for n in names] for r in table] == rows
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert state["classifier.5.weight"].shape[0] == classes  # LeNet-5's last layer


@pytest.mark.parametrize("case", ["three", "twelve"])
def test_a_folder_of_n_classes_trains_an_n_output_model_with_right_per_class_numbers(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = request.getfixturevalue(case)
    classes = {"three": 3, "twelve": 12}[case]
    if case == "three":  # the dry run says the count (the twelve: in the trained model)
        dry = run_cli(*_folder_args(root), "dry_run=true", cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert f"\nclasses: {classes} (the model's outputs), images 32x32\n" in dry.stdout
        assert f"-> output {classes}; " in dry.stdout
    run_dir = tmp_path / "run"
    proc = run_cli(*_folder_args(root), f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_numbers_match_a_recount(run_dir, classes)
    assert "num_classes: " + str(classes) in (run_dir / "config.yaml").read_text()
    assert results(run_dir)["val_size"] == round(0.1 * 10 * classes)  # images held out
    assert results(run_dir)["memory_format"] == "contiguous"  # speed=plain: no channels_last


def test_a_64x64_folder_trains_resized_to_32(big: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        *_folder_args(big), "data.image_size=32", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_numbers_match_a_recount(run_dir, 10)
    assert results(run_dir)["image_size"] == 32


def test_a_64x64_folder_at_64_and_the_model_that_cannot_take_it(big: Path, tmp_path: Path) -> None:
    ok = run_cli(
        *_folder_args(big), "data.image_size=64", "model=resnet20", "dry_run=true", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert "images 64x64" in ok.stdout and "input 3x64x64 -> output 10; " in ok.stdout
    # cnn7's input_size follows the data: its flatten width is computed for 64x64.
    cnn7 = follow_data(compose_cfg([*_folder_args(big), "data.image_size=64", "model=cnn7"]))
    assert cnn7.model.input_size == 64
    check_input(build_model(cnn7.model), 64, 10, "cnn7", "data.image_size=64")
    lenet = run_cli(*_folder_args(big), "data.image_size=64", "dry_run=true", cwd=tmp_path)
    assert lenet.returncode == 2
    assert one_line(lenet.stderr).startswith(
        "cifar-run: error: data.image_size=64: model lenet5 cannot take 64x64 images ("
    )


def test_mixed_sizes_decode_to_one_size_and_the_cache_keeps_sizes_apart(tmp_path: Path) -> None:
    root = resized_copy(tmp_path / "mixed", lambda i: [(64, 64), (48, 40), (32, 32)][i % 3])
    cache = tmp_path / "cache"
    train, test, classes = sources.load_imagefolder(root, cache, image_size=32)
    assert train.images.shape == (300, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    # An image already 32x32 is taken pixel for pixel (the first 32x32 one is the third).
    with Image.open(root / "train" / classes[0] / "0002.png") as img:
        exact = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(train.images[2], exact)
    small, _, _ = sources.load_imagefolder(root, cache, image_size=24)
    assert small.images.shape == (300, 3, 24, 24)
    assert len(list(cache.glob("*.npz"))) == 2  # one per size
    again, _, _ = sources.load_imagefolder(root, cache, image_size=32)
    assert torch.equal(again.images, train.images)


def test_a_corrupt_training_image_is_skipped_or_with_strict_one_line_naming_it(
    tmp_path: Path,
) -> None:
    root = copy_classes(tmp_path / "data", CLASSES_3)
    bad = corrupt(root / "train" / "cat" / "broken.jpg")
    train, _, _ = sources.load_imagefolder(root, None, image_size=24)
    assert train.skipped == (str(bad),) and train.images.shape[1:] == (3, 24, 24)
    with pytest.raises(UserError, match=re.escape(f"data.strict=true: cannot read image {bad}")):
        sources.load_imagefolder(root, None, strict=True)


def test_num_classes_that_disagrees_with_the_data_is_one_line_before_training(
    three: Path, tmp_path: Path
) -> None:
    proc = run_cli(
        *_folder_args(three),
        "model.num_classes=10",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cifar-run: error: model.num_classes=10: the data has 3 classes (class folders in "
        f"{three}/train); set it to null (follow the data) or 3"
    ]
    assert not (tmp_path / "r").exists()
    cfg = compose_cfg(_folder_args(three) + ["model.num_classes=3"])
    validate(cfg)  # the matching count is fine
    assert follow_data(cfg).model.num_classes == 3


def test_model_keys_follow_the_data_and_old_explicit_values_still_work() -> None:
    cfg = follow_data(compose_cfg(["model=cnn"]))
    assert cfg.model.num_classes == 10 and cfg.model.input_size == 32
    hundred = follow_data(compose_cfg(["model=cnn", "data=cifar100"]))
    assert hundred.model.num_classes == 100
    explicit = compose_cfg(["model=cnn", "model.num_classes=10", "model.input_size=32"])
    assert follow_data(explicit) is explicit  # nothing to fill
    validate(explicit)


@pytest.mark.parametrize("classes", [3, 10, 11, 100])
def test_confusion_matrix_is_exact_for_any_class_count(classes: int) -> None:
    torch.manual_seed(classes)
    logits = torch.randn(250, classes)
    labels = torch.randint(0, classes, (250,))
    batches = [(logits[i : i + 64], labels[i : i + 64]) for i in range(0, 250, 64)]
    stats = evaluate(
        nn.Identity(), batches, nn.CrossEntropyLoss(), device=torch.device("cpu"),
        num_classes=classes,
    )  # fmt: skip
    expected = torch.zeros(classes, classes, dtype=torch.long)
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(stats.confusion, expected) and int(stats.confusion.sum()) == 250
    with pytest.raises(ValueError, match="outputs for"):  # a model of another width
        evaluate(
            nn.Identity(), batches, nn.CrossEntropyLoss(), device=torch.device("cpu"),
            num_classes=classes + 1,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# CIFAR-100 (no network here: its loading is tested up to the download)


def test_cifar100_dry_run_shows_100_outputs(tmp_path: Path) -> None:
    proc = run_cli("data=cifar100", "dry_run=true", f"data.root={tmp_path / 'c100'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\nclasses: 100 (the model's outputs), images 32x32\n" in proc.stdout
    assert "-> output 100; " in proc.stdout
    assert not (tmp_path / "c100").exists() and not (tmp_path / "outputs").exists()


def test_cifar100_that_cannot_be_had_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "c100"
    root.mkdir()
    # The download fails at once through a proxy that refuses it.
    refused = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = run_cli(
        "data=cifar100", f"data.root={root}", "data.download=true", "epochs=1",
        "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
        env={**refused, "no_proxy": "", "NO_PROXY": ""},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith(
        f"cifar-run: error: data.root={root}: CIFAR-100 is not there and could not be downloaded"
    )
    assert "cifar-100-python.tar.gz" in line
    with pytest.raises(UserError, match=re.escape(f"data.root={root}: CIFAR-100 is not there")):
        sources.load_cifar("cifar100", root, download=False)  # offline: no network touched


def test_cifar100_loads_fine_labels_with_its_own_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    from cifar_run.constants import CIFAR100_MEAN, CIFAR100_STD
    from cifar_run.data.augment import normalization

    made = []

    class Fake:  # what torchvision.datasets.CIFAR100 holds: HWC uint8, fine labels, names
        def __init__(self, root: str, train: bool, download: bool) -> None:
            made.append((root, train, download))
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
            self.targets = [i * 19 % 100 for i in range(n)]
            self.classes = [f"c{i:02d}" for i in range(100)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Fake)
    train, test, classes = sources.load_cifar("cifar100", tmp_path, download=False)
    assert made == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == [0, 19, 38, 57, 76, 95]
    assert len(classes) == 100 and classes[19] == "c19"
    assert normalization("cifar", train.images, "cifar100") == (CIFAR100_MEAN, CIFAR100_STD)
    assert normalization("cifar", train.images, "imagefolder") != (CIFAR100_MEAN, CIFAR100_STD)


def test_hidden_folders_are_no_classes(tmp_path: Path) -> None:
    root = copy_classes(tmp_path / "data", CLASSES_3)
    for split in ("train", "test"):
        (root / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(TEST_DATA / split / "dog" / "0000.jpg", root / split / ".ipynb_checkpoints")
    _, _, classes = sources.load_imagefolder(root, None)
    assert classes == CLASSES_3
    cfg = compose_cfg(_folder_args(root))
    validate(cfg)
    assert follow_data(cfg).model.num_classes == 3
