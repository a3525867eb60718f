"""A small Vision Transformer (Dosovitskiy et al. 2020), pre-norm encoder.

Defaults are ViT-Tiny-like (dim 192, 6 layers, 3 heads) with 4x4 patches,
sized for 32x32 images; raise ``patch_size`` for larger images.
"""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    """Patch embedding + class token + learned positions + transformer encoder + linear head."""

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"image {height}x{width} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        patches = (height // patch_size) * (width // patch_size)
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            int(dim * mlp_ratio),
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.encoder(self.drop(x))
        return self.head(self.norm(x[:, 0]))


def vit(
    num_classes: int,
    image_shape: tuple[int, int, int],
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
) -> ViT:
    """Small ViT; see :class:`ViT`."""
    return ViT(num_classes, image_shape, patch_size, dim, depth, heads, mlp_ratio, dropout)
