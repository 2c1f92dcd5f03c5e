"""scripts/gpu_kit.py packs what a GPU machine lacks and rebuilds it there unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import REPO, TEST_DATA, run_script


def _gpu_kit():  # noqa: ANN202 (a module loaded from scripts/)
    spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "scripts" / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_images_come_back_byte_for_byte(tmp_path: Path) -> None:
    kit = _gpu_kit()
    packed = tmp_path / "kit"
    packed.mkdir()
    files = sorted(p for p in TEST_DATA.rglob("*") if p.is_file())
    size = kit.pack_images(TEST_DATA, packed)
    assert size >= sum(p.stat().st_size for p in files)
    assert kit.unpack_images(packed, tmp_path / "images") == len(files) == 500
    for path in files:
        copy = tmp_path / "images" / path.relative_to(TEST_DATA)
        assert copy.read_bytes() == path.read_bytes()


def test_packages_are_copied_without_caches(tmp_path: Path) -> None:
    kit = _gpu_kit()
    assert kit.copy_packages(tmp_path) > 0
    for name in kit.PACKAGES:
        assert (tmp_path / name / "__init__.py").is_file()
    assert not list(tmp_path.rglob("__pycache__"))


def test_run_without_a_pack_says_what_to_do(tmp_path: Path) -> None:
    proc = run_script("gpu_kit.py", "run", "--kit", str(tmp_path / "none"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "images.bin: run `pack` here and carry .gpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_logs_each_check_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script(
        "gpu_kit.py",
        "run",
        "--data",
        str(TEST_DATA),
        "--only",
        "env",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    log = (out / "env.log").read_text()
    assert "import torch" in log  # the commands are logged, then their output
    assert "no GPU" in log or "NVIDIA" in log  # torch's view of the GPU
    assert (out / "summary.txt").read_text().startswith("env: ")
