"""`cifar-run predict`: a trained run's checkpoint on new image files, as CSV."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cifar_run.constants import CIFAR10_MEAN, CIFAR10_STD
from cifar_run.models import build_model

from .conftest import TEST_DATA, TINY, run_cli
from .folders import corrupt, results


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run's folder (its best.pt, config.yaml, results.json)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def twenty(tmp_path: Path) -> Path:
    """20 image files: 17 test JPEGs, 2 enlarged PNGs (resized back when read), 1 corrupt."""
    folder = tmp_path / "new images"
    (folder / "more").mkdir(parents=True)
    files = sorted((TEST_DATA / "test").glob("*/0000.jpg")) + sorted(
        (TEST_DATA / "test").glob("*/0001.jpg")
    )
    for i, path in enumerate(files[:17]):
        shutil.copy(path, folder / f"{i:02d}_{path.parent.name}.jpg")
    for i, path in enumerate(files[17:19]):
        with Image.open(path) as img:
            img.resize((64, 64)).save(folder / "more" / f"big{i}.png")
    corrupt(folder / "broken.jpg")
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored\n")
    return folder


def _predict(*args: str, cwd: Path):
    return run_cli("predict", *args, cwd=cwd)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _run_model(run_dir: Path, paths: list[Path]) -> list[int]:
    """The run's best.pt on these 32x32 images, normalized as its training did."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = build_model(cfg.model).eval()
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True))
    images = []
    for path in paths:
        with Image.open(path) as img:
            assert img.size == (32, 32)
            images.append(torch.from_numpy(np.array(img.convert("RGB"))))
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        return model(x).argmax(1).tolist()


def test_predict_a_folder_of_20_with_a_corrupt_file(
    trained: Path, twenty: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    proc = _predict(
        "--ckpt",
        str(trained / "checkpoints" / "best.pt"),
        "--out",
        str(out),
        str(twenty),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    broken = twenty / "broken.jpg"
    assert lines[0].startswith(f"cifar-run predict: {broken}: cannot read it as an image (")
    assert lines[0].endswith("; skipped")
    assert lines[1] == f"cifar-run predict: wrote 19 predictions to {out} (1 skipped)"
    rows = _rows(out.read_text())
    assert list(rows[0]) == ["file", "top1", "p1", "top2", "p2", "top3", "p3"]
    assert len(rows) == 19 and not any("broken" in r["file"] for r in rows)
    classes = results(trained)["classes"]
    for row in rows:
        probs = [float(row[f"p{i}"]) for i in (1, 2, 3)]
        assert 1 >= probs[0] >= probs[1] >= probs[2] >= 0
        assert {row["top1"], row["top2"], row["top3"]} <= set(classes)
        assert len({row["top1"], row["top2"], row["top3"]}) == 3
    # The same top class as the run's own model on the JPEGs (the PNGs are resized first).
    jpegs = [r for r in rows if r["file"].endswith(".jpg")]
    expected = _run_model(trained, [Path(r["file"]) for r in jpegs])
    assert [r["top1"] for r in jpegs] == [classes[i] for i in expected]


def test_predict_takes_the_run_folder_and_files_and_writes_to_stdout(
    trained: Path, twenty: Path, tmp_path: Path
) -> None:
    files = sorted(twenty.glob("*.jpg"))[:2]
    proc = _predict("--ckpt", str(trained), "--top-k", "1", *map(str, files), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert list(rows[0]) == ["file", "top1", "p1"] and proc.stderr == ""


def test_predict_fails_only_when_nothing_could_be_predicted(trained: Path, tmp_path: Path) -> None:
    bad = [corrupt(tmp_path / "a.jpg"), tmp_path / "missing.png"]
    proc = _predict("--ckpt", str(trained), *map(str, bad), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"cifar-run predict: {bad[1]}: no such file or folder; skipped"
    assert lines[1].startswith(f"cifar-run predict: {bad[0]}: cannot read it as an image (")
    assert lines[2].startswith("cifar-run predict: error: no image could be predicted (2 skipped)")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--ckpt", "nowhere.pt"], "--ckpt nowhere.pt: no such file"),
        (["--ckpt", "{run}", "--top-k", "0"], "--top-k 0: must be a positive integer"),
        (["--ckpt", "{run}", "--config", "nope.yaml"], "--config nope.yaml: no such file"),
    ],
)
def test_predict_mistakes_are_one_line(
    trained: Path, tmp_path: Path, args: list[str], named: str
) -> None:
    args = [a.format(run=trained) for a in args]
    proc = _predict(*args, str(TEST_DATA / "test" / "cat" / "0000.jpg"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cifar-run predict: error: {named}"), lines
