"""CIFAR-10 facts, defined once."""

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

IMAGE_SHAPE = (3, 32, 32)
