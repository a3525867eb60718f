"""A small CNN for small images (CIFAR-sized).

It has no batch-norm on purpose: every layer is a function of the weights
and the sample only, so N ranks with a split batch compute exactly the same
averaged gradient as one rank with the whole batch (the equivalence test).
"""

from __future__ import annotations

from torch import nn


def small_cnn(
    num_classes: int, image_shape: tuple[int, int, int], width: int = 32, hidden: int = 128
) -> nn.Module:
    """conv-relu-pool x2, then a 2-layer classifier head; ``width`` channels in the first conv."""
    channels, height, wide = image_shape
    if height < 4 or wide < 4:
        raise ValueError(f"images must be at least 4x4, got {height}x{wide}")
    flat = 2 * width * (height // 4) * (wide // 4)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
