"""cifar-run: a configurable experiment runner for CIFAR-10 image classification."""

__version__ = "0.1.0"
