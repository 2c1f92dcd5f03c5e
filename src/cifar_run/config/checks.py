"""Config validation: every user mistake becomes one UserError line before data loads.

`validate` runs one check per part of the config (top-level keys, then one per group); each
names the key, the value and what is allowed. Keys of the `model` group are checked by
model construction, which also happens before any data is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cifar_run.config.reference import parse_reference
from cifar_run.config.values import (
    boolean,
    in_range,
    is_int,
    is_number,
    non_negative_int,
    number_pair,
    one_of,
    positive_int,
    positive_number,
    seed_value,
)
from cifar_run.constants import MIX_MODES, PRECISIONS, TTA_MODES
from cifar_run.data.folders import list_imagefolder
from cifar_run.errors import UserError
from cifar_run.outputs.loggers.settings import check_loggers
from cifar_run.prune.settings import PruningSettings, validate_pruning
from cifar_run.speed.settings import SpeedSettings

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
CIFAR10_TRAIN_IMAGES = 50_000
DATA_SOURCES = ("cifar10", "imagefolder")

# Keys the code reads from each part of the config; removing one (`~seed`) is a mistake.
REQUIRED_KEYS = {
    "": (
        "model",
        "data",
        "augment",
        "optim",
        "sched",
        "batch_size",
        "lr",
        "epochs",
        "prune",
        "seed",
        "device",
        "dry_run",
        "resume",
        "deterministic",
        "precision",
        "compile",
        "tta",
        "keep_state",
    ),
    "data": ("name", "root", "download", "val_size", "subset", "split_seed", "cache_dir"),
}


def check_device(value: Any) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and the CUDA device must exist."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise UserError(f"device={value}: must be auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"device={value}: CUDA is not available on this machine; use device=cpu or auto"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device={value}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def check_data(data: DictConfig) -> None:
    """The `data` group: source, folder, split sizes and seeds."""
    if data.name not in DATA_SOURCES:
        raise UserError(
            f"data.name={data.name}: unknown source; allowed: {', '.join(DATA_SOURCES)}"
        )
    boolean("data.download", data.download)
    if "strict" in data:  # image folders only: what an unreadable file does
        boolean("data.strict", data.strict)
    if data.cache_dir is not None and not isinstance(data.cache_dir, str):
        raise UserError(f"data.cache_dir={data.cache_dir}: must be a folder path or null")
    seed_value("data.split_seed", data.split_seed)
    if data.subset is not None:
        positive_int("data.subset", data.subset)

    root = None if data.root is None else Path(str(data.root)).expanduser()
    train_images = None  # known before loading for CIFAR-10 and image folders
    if data.name == "imagefolder":
        if root is None or not root.is_dir():
            raise UserError(
                f"data.root={data.root}: no such folder; point it at a folder holding "
                "train/<class>/* and test/<class>/*"
            )
        for part in ("train", "test"):
            if not (root / part).is_dir():
                raise UserError(
                    f"data.root={data.root}: no '{part}' folder; expected "
                    f"{data.root}/train/<class>/*.jpg and {data.root}/test/<class>/*.jpg"
                )
        # A directory listing, nothing decoded: also finds empty class folders.
        train_images = len(list_imagefolder(root).train)
    else:
        if root is None:
            raise UserError("data.root=None: must be the folder holding cifar-10-batches-py/")
        if not data.download and not root.is_dir():
            raise UserError(f"data.root={data.root}: no such folder and data.download=false")
        train_images = CIFAR10_TRAIN_IMAGES

    val = data.val_size
    if isinstance(val, float):
        if not 0 < val < 1:
            raise UserError(
                f"data.val_size={val}: a fraction must be in (0, 1); or give a count >= 0"
            )
    elif not is_int(val) or not 0 <= val < train_images:
        raise UserError(
            f"data.val_size={val}: must be a count in [0, {train_images}) (the training set "
            f"has {train_images} images) or a fraction in (0, 1)"
        )


NORMALIZE = ("cifar", "half", "dataset", "imagenet")
PADDING_MODES = ("zeros", "reflect")
AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")


def check_augment(aug: DictConfig) -> None:
    """The keys of the augment group that the chosen set has."""
    one_of("augment.normalize", aug.normalize, NORMALIZE)
    if "padding" in aug:
        non_negative_int("augment.padding", aug.padding)
    if "padding_mode" in aug:
        one_of("augment.padding_mode", aug.padding_mode, PADDING_MODES)
        if aug.padding_mode == "reflect" and aug.get("padding", 0) >= 32:
            raise UserError(
                f"augment.padding={aug.padding}: reflect padding must be less than the "
                "image side (at most 31)"
            )
    if "flip" in aug:
        in_range("augment.flip", aug.flip, 0, 1, "a probability in [0, 1]")
    if "degrees" in aug:
        in_range("augment.degrees", aug.degrees, 0, 180, "an angle in [0, 180] degrees")
    if "scale" in aug:
        number_pair("augment.scale", aug.scale, 0, 1, "0 < min <= max <= 1 (fractions of the area)")
    if "ratio" in aug:
        number_pair("augment.ratio", aug.ratio, 0, float("inf"), "0 < min <= max (width / height)")
    if "size" in aug and (not is_int(aug.size) or not 1 <= aug.size <= 32):
        raise UserError(f"augment.size={aug.size}: must be an integer in 1..32 (pixels)")
    if "policy" in aug:
        one_of("augment.policy", aug.policy, AUTOAUGMENT_POLICIES)
    if "num_magnitude_bins" in aug and (
        not is_int(aug.num_magnitude_bins) or aug.num_magnitude_bins < 2
    ):
        raise UserError(
            f"augment.num_magnitude_bins={aug.num_magnitude_bins}: must be an integer >= 2"
        )


def check_mix(mix: DictConfig | None) -> None:
    """The `mix` group (a saved config may lack it: no mixing)."""
    if mix is None:
        return
    one_of("mix.name", mix.get("name"), MIX_MODES)
    if mix.name == "none":
        return
    in_range("mix.alpha", mix.get("alpha"), 0, float("inf"), "a number > 0", open_lo=True)
    in_range("mix.prob", mix.get("prob"), 0, 1, "a probability in [0, 1]")
    if mix.name == "mixup_cutmix":
        in_range(
            "mix.cutmix_alpha",
            mix.get("cutmix_alpha"),
            0,
            float("inf"),
            "a number > 0",
            open_lo=True,
        )
        in_range("mix.switch_prob", mix.get("switch_prob"), 0, 1, "a probability in [0, 1]")


def check_optim(optim: DictConfig) -> None:
    """The keys of the optim group that the chosen optimizer has."""
    in_range(
        "optim.label_smoothing", optim.get("label_smoothing", 0.0), 0, 1, "in [0, 1)", open_hi=True
    )
    if "decay_norm_and_bias" in optim:
        boolean("optim.decay_norm_and_bias", optim.decay_norm_and_bias)
    if optim.get("grad_clip") is not None:
        positive_number("optim.grad_clip", optim.grad_clip)
    if "momentum" in optim:
        in_range("optim.momentum", optim.momentum, 0, 1, "in [0, 1)", open_hi=True)
    if "weight_decay" in optim:
        in_range("optim.weight_decay", optim.weight_decay, 0, float("inf"), "a number >= 0")
    if "nesterov" in optim:
        boolean("optim.nesterov", optim.nesterov)
        if optim.nesterov and not optim.get("momentum", 0) > 0:
            raise UserError(
                f"optim.nesterov=true: needs optim.momentum > 0 (got {optim.get('momentum')})"
            )
    if "fused" in optim:
        boolean("optim.fused", optim.fused)
    if "betas" in optim:
        betas = optim.betas
        if (
            isinstance(betas, str)
            or not isinstance(betas, Sequence)
            or len(betas) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise UserError(f"optim.betas={betas}: must be [beta1, beta2], each in [0, 1)")


def check_sched(sched: DictConfig, epochs: int, has_val: bool) -> None:
    """The keys of the sched group that the chosen schedule has, against the run length."""
    interval = one_of("sched.interval", sched.get("interval", "epoch"), ("epoch", "step"))
    warmup = non_negative_int("sched.warmup_epochs", sched.get("warmup_epochs", 0))
    if warmup >= epochs:
        raise UserError(
            f"sched.warmup_epochs={warmup}: must be less than epochs={epochs} "
            "(warmup is part of the run)"
        )
    if "warmup_start_factor" in sched:
        in_range(
            "sched.warmup_start_factor", sched.warmup_start_factor, 0, 1, "in (0, 1]", open_lo=True
        )
    main_epochs = epochs - warmup
    if "step_size" in sched:
        positive_int("sched.step_size", sched.step_size)
    if "milestones" in sched:
        ms = sched.milestones
        if (
            isinstance(ms, str)
            or not isinstance(ms, Sequence)
            or not all(is_int(m) and 1 <= m <= main_epochs for m in ms)
        ):
            raise UserError(
                f"sched.milestones={ms}: must be a list of epochs in 1..{main_epochs} "
                f"(epochs={epochs} minus warmup_epochs={warmup}; counted after warmup)"
            )
    if ("step_size" in sched or "milestones" in sched) and interval != "epoch":
        raise UserError(f"sched.interval={interval}: {sched.name} counts epochs; allowed: epoch")
    if "gamma" in sched:
        positive_number("sched.gamma", sched.gamma)
    for key in ("T_max", "total_steps"):
        if key in sched and sched[key] is not None:
            positive_int(f"sched.{key}", sched[key])
    for key in ("eta_min", "min_lr", "threshold"):
        if key in sched:
            in_range(f"sched.{key}", sched[key], 0, float("inf"), "a number >= 0")
    if "max_lr" in sched:
        positive_number("sched.max_lr", sched.max_lr)
    if "pct_start" in sched:
        in_range("sched.pct_start", sched.pct_start, 0, 1, "in (0, 1)", open_lo=True, open_hi=True)
    for key in ("div_factor", "final_div_factor"):
        if key in sched:
            positive_number(f"sched.{key}", sched[key])
    if "anneal_strategy" in sched:
        one_of("sched.anneal_strategy", sched.anneal_strategy, ("cos", "linear"))
    if "cycle_momentum" in sched:
        boolean("sched.cycle_momentum", sched.cycle_momentum)
    if "base_momentum" in sched:
        in_range("sched.base_momentum", sched.base_momentum, 0, 1, "in [0, 1)", open_hi=True)
    if "max_momentum" in sched:
        low = sched.get("base_momentum", 0)
        in_range(
            "sched.max_momentum",
            sched.max_momentum,
            low,
            1,
            f"in [base_momentum={low}, 1)",
            open_hi=True,
        )
    if "monitor" in sched:
        one_of("sched.monitor", sched.monitor, ("val_acc", "val_loss"))
        if interval != "epoch":
            raise UserError(
                f"sched.interval={interval}: plateau steps after validation; allowed: epoch"
            )
        if not has_val:
            raise UserError(
                f"sched={sched.name}: needs a validation split to monitor {sched.monitor}; "
                "data.val_size=0"
            )
    if "factor" in sched:
        in_range("sched.factor", sched.factor, 0, 1, "in (0, 1)", open_lo=True, open_hi=True)
    for key in ("patience", "cooldown"):
        if key in sched:
            non_negative_int(f"sched.{key}", sched[key])
    if "threshold_mode" in sched:
        one_of("sched.threshold_mode", sched.threshold_mode, ("rel", "abs"))


def check_structure(cfg: DictConfig) -> None:
    """Every required key is there, has a value (not `???`) and resolves."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]}=???: no value given; set it, e.g. {missing[0]}=<value>")
    for group, keys in REQUIRED_KEYS.items():
        node = OmegaConf.select(cfg, group) if group else cfg
        for key in keys:
            if not isinstance(node, DictConfig) or key not in node:
                full = f"{group}.{key}" if group else key
                raise UserError(f"{full}: missing from the config; this key is required")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        message = str(exc).strip().splitlines()[0]
        raise UserError(f"{exc.full_key or 'config'}: cannot be resolved ({message})") from None


def check_top_level(cfg: DictConfig) -> None:
    """The keys of conf/config.yaml itself."""
    positive_int("batch_size", cfg.batch_size)
    positive_number("lr", cfg.lr)
    non_negative_int("epochs", cfg.epochs)
    # A resumed run takes its weights from state.pt: the file it started from may be gone.
    check_ckpt_path(cfg.get("ckpt_path"), cfg.epochs, must_exist=cfg.resume is not True)
    if cfg.get("early_stop") is not None:
        positive_int("early_stop", cfg.early_stop)
    seed_value("seed", cfg.seed)
    check_device(cfg.device)
    if cfg.get("threads") is not None:
        positive_int("threads", cfg.threads)
    one_of("precision", cfg.precision, PRECISIONS)
    boolean("compile", cfg.compile)
    one_of("tta", cfg.tta, TTA_MODES)
    boolean("dry_run", cfg.dry_run)
    boolean("resume", cfg.resume)
    boolean("keep_state", cfg.keep_state)
    boolean("deterministic", cfg.deterministic)
    boolean("preview", cfg.preview)


def check_ckpt_path(value: Any, epochs: int, must_exist: bool = True) -> None:
    """`ckpt_path`: null, or a file (that exists, with `must_exist`); `epochs=0` (no
    training) needs one."""
    if value is None:
        if epochs == 0:
            raise UserError(
                "epochs=0: trains nothing, so it needs weights to evaluate: ckpt_path=FILE "
                "(e.g. an earlier run's checkpoints/best.pt); otherwise a positive integer"
            )
        return
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"ckpt_path={value}: must be the path of a checkpoint file, or null")
    path = Path(value).expanduser()
    if must_exist and not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise UserError(
            f"ckpt_path={value}: {what}; give a state dict file such as a run's checkpoints/best.pt"
        )


def check_pruning(cfg: DictConfig) -> PruningSettings:
    """`prune` and the `pruning` group; with a pruning stage, the layer selection too.

    The selection is checked on a model built on the meta device (no memory, no init work),
    so an empty one fails here, before any data loads.
    """
    settings = validate_pruning(cfg.prune, cfg.get("pruning"))
    if settings.enabled or settings.curve:
        import torch

        from cifar_run.models import build_model
        from cifar_run.prune.masks import prunable_parameters

        try:
            with torch.device("meta"):
                model = build_model(cfg.model)
        except Exception:  # a broken model config is reported where the run builds it
            return settings
        prunable_parameters(model, settings.include_classifier)
    return settings


def validate(cfg: DictConfig) -> None:
    """Check types and ranges of every key, raising UserError: one check per part."""
    check_structure(cfg)
    check_top_level(cfg)
    check_data(cfg.data)
    check_augment(cfg.augment)
    check_mix(cfg.get("mix"))
    check_optim(cfg.optim)
    if cfg.epochs > 0:  # with epochs=0 no schedule is built
        check_sched(cfg.sched, cfg.epochs, has_val=cfg.data.val_size != 0)
    if cfg.get("ema") is not None:
        in_range("ema", cfg.ema, 0, 1, "a decay in (0, 1), or null", open_lo=True, open_hi=True)
    if cfg.get("early_stop") is not None and cfg.data.val_size == 0:
        raise UserError(
            f"early_stop={cfg.early_stop}: needs a validation split to watch; data.val_size=0"
        )
    SpeedSettings.from_config(cfg.get("speed"))
    # An experiment's published figures: only the sweep summary reads them, at the end of a
    # sweep, so a typo must fail here, before training.
    parse_reference(cfg.get("reference"))
    check_loggers(cfg)
    settings = check_pruning(cfg)
    if settings.early_stop is not None and settings.finetune_epochs > 0 and cfg.data.val_size == 0:
        raise UserError(
            f"pruning.early_stop={settings.early_stop}: needs a validation split to watch; "
            "data.val_size=0"
        )
