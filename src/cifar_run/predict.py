"""`cifar-run predict`: a trained checkpoint on new images, the top-k classes of each as CSV.

The model is built from the run folder's config.yaml as the run built it, and every image is
read as training read its image folder (data.images: resized to the run's image size) and
normalized with the run's mean and std (results.json), with the run's test-time augmentation.
A file that cannot be read is one line on stderr and is left out; the command fails only when
no image could be predicted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "cifar-run predict"
EXIT_USER_ERROR = 2
BATCH = 256  # images decoded and evaluated at a time: memory stays bounded for any folder


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def _warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict the classes of image files with a trained run: writes a CSV "
        "with one row per image (file, top1, p1, top2, p2, ...).",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files or folders of them"
    )
    parser.add_argument(
        "--ckpt",
        type=Path,
        required=True,
        metavar="FILE",
        help="the weights: a run's checkpoints/best.pt (last.pt, pruned.pt), or the run folder "
        "itself for its best.pt",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the run's config.yaml (default: the one in the checkpoint's run folder)",
    )
    parser.add_argument(
        "--top-k", type=int, default=3, metavar="K", help="classes per image (default 3)"
    )
    parser.add_argument("--out", type=Path, metavar="CSV", help="write here (default: stdout)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )
    return parser


def _checkpoint_and_run(ckpt: Path) -> tuple[Path, Path]:
    """(the weights file, its run folder) for --ckpt FILE or --ckpt RUN_FOLDER."""
    if ckpt.is_dir():
        ckpt = ckpt / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        _fail(f"--ckpt {ckpt}: no such file; give a run's checkpoints/best.pt or its run folder")
    folder = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return ckpt, folder


def _load_config(path: Path) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if not path.is_file():
        _fail(f"--config {path}: no such file; give the run's config.yaml with --config")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # not YAML
        _fail(f"--config {path}: cannot read it as YAML ({_first_line(exc)})")
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
        _fail(f"--config {path}: no model in it; give the config.yaml a run wrote")
    return cfg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _results(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _classes(cfg: Any, results: dict[str, Any]) -> list[str] | None:
    """The class names in label order: results.json's, else what the config's data says."""
    from cifar_run.constants import CIFAR10_CLASSES

    if isinstance(results.get("classes"), list):
        return [str(c) for c in results["classes"]]
    data = cfg.get("data") or {}
    if data.get("name") == "cifar10":
        return list(CIFAR10_CLASSES)
    if data.get("name") == "imagefolder" and data.get("root"):
        from cifar_run.data.folders import class_folders

        train = Path(str(data.get("root"))).expanduser() / "train"
        if train.is_dir():
            return class_folders(train)
    return None


def _normalization(cfg: Any, results: dict[str, Any]) -> tuple[Sequence[float], Sequence[float]]:
    """The run's mean and std: results.json's, else from augment.normalize (for `dataset`,
    computed on the run's training split as the run did)."""
    from cifar_run.data.augment import normalization

    mean, std = results.get("normalize_mean"), results.get("normalize_std")
    if isinstance(mean, list) and isinstance(std, list):
        return mean, std
    mode, source = str(cfg.augment.normalize), str(cfg.data.name)
    images = None
    if mode == "dataset":
        from cifar_run.data.sources import load_splits
        from cifar_run.errors import UserError

        try:
            images = load_splits(cfg.data).train.images
        except UserError as exc:
            _fail(f"augment.normalize=dataset: needs the run's training images ({exc})")
    return normalization(mode, images, source)


def image_paths(paths: Sequence[Path]) -> Iterator[Path | str]:
    """Every image file named or under a named folder (by suffix, sorted); a path that is
    not there comes as a message (str) instead."""
    from cifar_run.constants import IMAGE_SUFFIXES

    for path in paths:
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_SUFFIXES):
                        yield Path(folder) / name
        elif path.is_file():
            yield path
        else:
            yield f"{path}: no such file or folder; skipped"


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `cifar-run predict`."""
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        _fail(f"--top-k {args.top_k}: must be a positive integer")
    ckpt, folder = _checkpoint_and_run(args.ckpt)
    cfg = _load_config(args.config or folder / "config.yaml")
    results = _results(folder)
    predictor = Predictor.build(cfg, ckpt, results, args.device)
    rows, bad = [], 0
    for chunk in _chunks(image_paths(args.paths), BATCH):
        for path in [c for c in chunk if isinstance(c, str)]:
            _warn(path)
            bad += 1
        got, failed = predictor.predict([c for c in chunk if not isinstance(c, str)], args.top_k)
        rows += got
        bad += failed
    if not rows:
        _fail(f"no image could be predicted ({bad} skipped) in {', '.join(map(str, args.paths))}")
    text = _csv(rows, min(args.top_k, len(predictor.classes)))
    if args.out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from cifar_run.outputs import atomic

        try:
            atomic.write_text(args.out, text)
        except OSError as exc:
            _fail(f"--out {args.out}: cannot write there ({exc.strerror or exc})")
        _warn(f"wrote {len(rows)} predictions to {args.out}" + (f" ({bad} skipped)" if bad else ""))


def _csv(rows: list[dict[str, Any]], k: int) -> str:
    columns = ["file"] + [c for i in range(1, k + 1) for c in (f"top{i}", f"p{i}")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class Predictor:
    """A run's model with its weights, image size, normalization and class names."""

    def __init__(
        self, model: Any, device: Any, size: int, mean: Any, std: Any, tta: str, classes: list[str]
    ) -> None:
        self.model, self.device, self.size, self.tta = model, device, size, tta
        self.mean, self.std, self.classes = mean, std, classes

    @classmethod
    def build(cls, cfg: Any, ckpt: Path, results: dict[str, Any], device: str) -> Predictor:
        import torch

        from cifar_run.config.data_keys import image_size
        from cifar_run.engine.checkpoint import load_weights
        from cifar_run.errors import UserError
        from cifar_run.models import build_model

        classes = _classes(cfg, results)
        size = image_size(cfg.data)
        model_cfg = _filled(cfg.model, classes, size)
        try:
            model = build_model(model_cfg)
            load_weights(model, ckpt)
            outputs = _outputs(model, size)
        except UserError as exc:
            _fail(str(exc))
        if classes is None or len(classes) != outputs:
            classes = [str(i) for i in range(outputs)]  # names unknown: the label numbers
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = dev if device == "auto" else torch.device(device)
            model.to(dev).eval()
        except (RuntimeError, AssertionError) as exc:
            _fail(f"--device {device}: cannot use it ({_first_line(exc)})")
        mean, std = _normalization(cfg, results)
        mean_t = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=dev).view(1, -1, 1, 1)
        return cls(model, dev, size, mean_t, std_t, str(cfg.get("tta")), classes)

    def predict(self, paths: list[Path], k: int) -> tuple[list[dict[str, Any]], int]:
        """(one row per readable image, the count of files that could not be read)."""
        import numpy as np
        import torch

        from cifar_run.data.images import read_image, reason

        arrays, kept, bad = [], [], 0
        for path in paths:
            try:
                arrays.append(read_image(str(path), self.size))
                kept.append(path)
            except Exception as exc:  # truncated, not an image, too large: about the file
                _warn(f"{path}: cannot read it as an image ({reason(exc)}); skipped")
                bad += 1
        if not arrays:
            return [], bad
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()).to(self.device)
        x = (x.float() / 255 - self.mean) / self.std
        with torch.no_grad():
            logits = self.model(x).float()
            if self.tta == "flip":
                logits = (logits + self.model(x.flip(3)).float()) / 2
        p, idx = torch.softmax(logits, 1).topk(min(k, logits.shape[1]), dim=1)
        rows = []
        for path, probs, labels in zip(kept, p.tolist(), idx.tolist(), strict=True):
            row: dict[str, Any] = {"file": str(path)}
            for i, (prob, label) in enumerate(zip(probs, labels, strict=True), start=1):
                row[f"top{i}"] = self.classes[label]
                row[f"p{i}"] = f"{prob:.6f}"
            rows.append(row)
        return rows, bad


def _outputs(model: Any, size: int) -> int:
    """The model's output count, from one blank image (a UserError if it takes none)."""
    import torch

    from cifar_run.errors import UserError

    model.eval()
    try:
        with torch.no_grad():
            return int(model(torch.zeros(1, 3, size, size)).shape[1])
    except (RuntimeError, ValueError, IndexError) as exc:
        raise UserError(
            f"the model cannot take {size}x{size} images ({_first_line(exc)})"
        ) from None


def _filled(model_cfg: Any, classes: list[str] | None, size: int) -> Any:
    """The model config with a null num_classes / input_size filled in as the run did (a
    config.yaml written before the run filled them, e.g. .hydra/config.yaml)."""
    from omegaconf import open_dict

    model_cfg = model_cfg.copy()
    with open_dict(model_cfg):
        if "num_classes" in model_cfg and model_cfg.num_classes is None and classes:
            model_cfg.num_classes = len(classes)
        if "input_size" in model_cfg and model_cfg.input_size is None:
            model_cfg.input_size = size
    return model_cfg
