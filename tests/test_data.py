from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cifar_run.data import folders
from cifar_run.data import sources as data
from cifar_run.errors import UserError

from .conftest import TEST_DATA


def test_imagefolder_loads_uint8_images_and_labels(tmp_path: Path) -> None:
    train, test, classes = data.load_imagefolder(TEST_DATA, tmp_path)
    assert classes[:2] == ["airplane", "automobile"] and len(classes) == 10
    assert train.images.shape == (300, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (200, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [30] * 10
    assert train.images.float().std() > 10  # real pixels, not zeros


def test_imagefolder_cache_is_used_and_notices_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "imgs"
    shutil.copytree(TEST_DATA, root)
    first, _, _ = data.load_imagefolder(root, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    calls = []
    real_decode = data._decode
    monkeypatch.setattr(
        data,
        "_decode",
        lambda paths, *a, **kw: calls.append(len(paths)) or real_decode(paths, *a, **kw),
    )
    again, _, _ = data.load_imagefolder(root, tmp_path / "cache")
    assert calls == [] and torch.equal(again.images, first.images)

    extra = root / "train" / "cat" / "extra.jpg"
    shutil.copy(next((root / "train" / "dog").iterdir()), extra)
    changed, _, _ = data.load_imagefolder(root, tmp_path / "cache")
    assert calls and len(changed) == len(first) + 1


def test_fingerprint_notices_a_touched_file(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    shutil.copytree(TEST_DATA, root)
    _, items = folders.list_split(root / "train")
    before = data._fingerprint(root, items)
    assert data._fingerprint(root, items) == before  # stable while nothing changes
    path = items[5][0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size, touched
    assert data._fingerprint(root, items) != before


def test_missing_split_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no 'test' folder"):
        data.load_imagefolder(tmp_path)


def test_stratified_split_is_disjoint_exact_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    train, val = data.stratified_split(labels, 100, seed=3)
    assert len(val) == 100 and len(train) == 400
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [10] * 10
    assert torch.equal(val, data.stratified_split(labels, 100, seed=3)[1])
    assert not torch.equal(val, data.stratified_split(labels, 100, seed=4)[1])


def test_subset_keeps_the_validation_fraction() -> None:
    train, test, classes = data.load_imagefolder(TEST_DATA)
    splits = data.make_splits(train, test, classes, val_size=60, subset=10, split_seed=0)
    # 60 of 300 is 20%: 20 of the 100 subset images, two per class.
    assert len(splits.val) == 20 and len(splits.train) == 80 and len(splits.test) == 100
    assert torch.bincount(splits.val.labels).tolist() == [2] * 10


def test_val_size_that_leaves_nothing_names_the_key() -> None:
    train, test, classes = data.load_imagefolder(TEST_DATA)
    with pytest.raises(UserError, match=r"data.val_size=300: leaves no training images"):
        data.make_splits(train, test, classes, val_size=300, subset=None, split_seed=0)


def test_cifar10_download_failure_says_how_to_provide_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError) as err:
        data.load_cifar10(tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message
    assert f"data.root={tmp_path / 'nowhere'}" in message and "cifar-10-python.tar.gz" in message
