"""Damaged image folders and decode caches: a warning or one line naming the file, never a
traceback, and nothing cached from a decode that failed."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_run.data import sources as data
from cifar_run.errors import UserError

from .conftest import TEST_DATA, TINY, one_line, read_results, run_cli


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    shutil.copytree(TEST_DATA, root)
    return root


def _damage(path: Path, kind: str) -> None:
    """A truncated JPEG (its first half) or an empty file in place of `path`."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if kind == "truncated" else b"")


def _args(root: Path, run_dir: Path) -> list[str]:
    without_root = [a for a in TINY if not a.startswith("data.root=")]
    return [*without_root, f"data.root={root}", f"hydra.run.dir={run_dir}"]


def test_unreadable_images_are_skipped_with_one_warning_each_and_counted(tmp_path: Path) -> None:
    root, cache = _copy(tmp_path), tmp_path / "cache"
    bad = [root / "train" / "cat" / "0003.jpg", root / "test" / "dog" / "0001.jpg"]
    _damage(bad[0], "truncated")
    _damage(bad[1], "empty")
    run_dir = tmp_path / "run"
    proc = run_cli(*_args(root, run_dir), cwd=tmp_path, env={"CIFAR_RUN_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for path in bad:
        warnings = [line for line in proc.stdout.splitlines() if str(path) in line]
        assert len(warnings) == 1 and "skipping unreadable image" in warnings[0], proc.stdout
    assert "an empty file" in proc.stdout
    assert "2 unreadable image file(s) skipped" in proc.stdout
    results = read_results(run_dir)
    assert results["status"] == "completed" and results["skipped_images"] == 2
    assert not list(cache.glob("*.npz"))  # decoded again next time, and warned about again
    assert str(bad[0]) in (run_dir / "cifar-run.log").read_text()  # the log keeps the warning


@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_strict_stops_at_an_unreadable_image_naming_it(tmp_path: Path, kind: str) -> None:
    root, cache = _copy(tmp_path), tmp_path / "cache"
    bad = root / "train" / "airplane" / "0000.jpg"
    _damage(bad, kind)
    run_dir = tmp_path / "run"
    proc = run_cli(
        *_args(root, run_dir), "data.strict=true", cwd=tmp_path, env={"CIFAR_RUN_CACHE": str(cache)}
    )
    assert proc.returncode == 2, proc.stderr
    assert f"data.strict=true: cannot read image {bad}" in one_line(proc.stderr)
    assert "Traceback" not in proc.stdout
    assert read_results(run_dir)["status"] == "failed"  # it started, and claims nothing
    assert not (run_dir / "checkpoints").exists() and not list(cache.glob("*.npz"))


@pytest.mark.parametrize(("split", "name"), [("train", "airplane"), ("test", "truck")])
def test_an_empty_class_folder_is_one_line_naming_it(tmp_path: Path, split: str, name: str) -> None:
    # airplane sorts first: its label 0 would be missing from the labels of every batch.
    root = _copy(tmp_path)
    folder = root / split / name
    for image in folder.iterdir():
        image.unlink()
    proc = run_cli(*_args(root, tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"class folder {folder} holds no image files" in one_line(proc.stderr)
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder
    with pytest.raises(UserError, match=f"class folder {folder} holds no image files"):
        data.load_imagefolder(root)


def _keep_only_cat(root: Path) -> None:
    for split in ("train", "test"):
        for folder in (root / split).iterdir():
            if folder.name != "cat":
                shutil.rmtree(folder)


LAYOUTS = {
    "one class": (
        _keep_only_cat,
        "train/ holds 1 class folder(s); a classifier needs at least 2",
    ),
    "classes differ": (
        lambda root: shutil.rmtree(root / "test" / "truck"),
        "train/ and test/ have different class folders (truck in only one of them)",
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_bad_layout_is_one_line_at_the_check_and_at_the_load(tmp_path: Path, layout: str) -> None:
    """The config check and the loader share the layout checks; both name data.root as given."""
    root = _copy(tmp_path)
    change, message = LAYOUTS[layout]
    change(root)
    proc = run_cli(*_args(root, tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"data.root={root}: {message}" in one_line(proc.stderr)
    assert "Traceback" not in proc.stdout
    with pytest.raises(UserError, match=re.escape(f"data.root={root}: {message}")):
        data.load_imagefolder(root)


def test_a_class_whose_images_are_all_unreadable_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    folder = root / "test" / "airplane"
    for image in folder.iterdir():
        _damage(image, "empty")
    with pytest.raises(UserError, match=f"class folder {folder} holds no readable image files"):
        data.load_imagefolder(root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_skipped_files_leave_their_labels_out_with_them(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    bad = root / "train" / "bird" / "0007.jpg"
    _damage(bad, "truncated")
    full, _, _ = data.load_imagefolder(TEST_DATA)
    train, test, classes = data.load_imagefolder(root)
    assert train.skipped == (str(bad),) and test.skipped == ()
    bird = classes.index("bird")
    assert torch.bincount(train.labels).tolist() == [29 if c == bird else 30 for c in range(10)]
    kept = torch.ones(len(full), dtype=torch.bool)
    kept[bird * 30 + 7] = False  # files are listed class by class, sorted by name
    assert torch.equal(train.images, full.images[kept])


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_an_unreadable_decode_cache_is_decoded_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first, first_test, _ = data.load_imagefolder(TEST_DATA, tmp_path)
    (cache,) = tmp_path.glob("*.npz")
    content = cache.read_bytes()
    cache.write_bytes(
        {"truncated": content[: len(content) // 2], "empty": b"", "garbage": b"not a zip"}[damage]
    )
    with caplog.at_level(logging.WARNING, logger="cifar_run.data.sources"):
        again, again_test, _ = data.load_imagefolder(TEST_DATA, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"the decode cache {cache} cannot be read" in warnings[0]
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert torch.equal(again_test.images, first_test.images)
    with np.load(cache) as z:  # written whole again, atomically
        assert np.array_equal(z["xtr"], first.images.numpy())
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temp file left


def test_a_truncated_decode_cache_through_the_cli(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"CIFAR_RUN_CACHE": str(cache)}
    data.load_imagefolder(TEST_DATA, cache)  # the cache the CLI's run would find
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:1000])
    again = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert f"the decode cache {npz} cannot be read" in again.stdout
    assert read_results(tmp_path / "b")["status"] == "completed"
    with np.load(npz) as z:
        assert z["xtr"].shape[1:] == (3, 32, 32)
