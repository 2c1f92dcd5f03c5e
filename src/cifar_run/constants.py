"""CIFAR-10 and CIFAR-100 facts, defined once."""

import os

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Per-channel statistics of the 50k training images. Note the std: kuangliu/pytorch-cifar's
# (0.2023, 0.1994, 0.2010) is a long-lived typo; these are the measured values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The same for CIFAR-100's 50k training images (augment.normalize=cifar with data=cifar100).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# What torchvision's ImageNet weights were trained with (model.weights of resnet18_tv).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SHAPE = (3, 32, 32)  # CIFAR's; an image folder's side is data.image_size
# Classes of the torchvision sources (data.name), known before anything is loaded; an image
# folder has one class per folder under train/.
SOURCE_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_TRAIN_IMAGES = 50_000  # both CIFAR-10 and CIFAR-100
# Files an image folder's class folders hold (data=imagefolder); others are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# `precision` values: autocast dtype of training and evaluation (auto: see cifar_run.speed.setup).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# `mix.name` values: batch mixing of training batches (cifar_run.data.mix).
MIX_MODES = ("none", "mixup", "cutmix", "mixup_cutmix")

# `tta` values: test-time augmentation of every evaluation (validation, test, pruning stage).
TTA_MODES = ("none", "flip")

# How long an OpenMP thread that has run out of work spins before it sleeps. libgomp's default
# (300,000 spins) is fast on an idle machine and ruinous on a busy one: a waiting thread spins
# on a core another process needs while the thread it waits for is descheduled. Never
# spinning (OMP_WAIT_POLICY=PASSIVE) instead pays a sleep and a wake-up between every two
# parallel ops, which leaves the cores idle in nets of many small ops. A short spin covers the
# gap between back-to-back ops and gives the core up soon after (docs/speed.md). libgomp reads
# this once, when torch is first imported, so entry points set it before that, unless the
# environment already sets OMP_WAIT_POLICY or GOMP_SPINCOUNT.
OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}
OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_defaults() -> None:
    """OPENMP_ENV into the environment, where it does not say otherwise; call it before
    anything imports torch (cifar-run and the scripts that train as it does)."""
    if any(key in os.environ for key in OPENMP_KEYS):
        return
    os.environ.update(OPENMP_ENV)
