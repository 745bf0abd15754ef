"""Vision Transformer encoder and decoder over non-overlapping patches (ViT-VQGAN, Yu et al. 2021).

- Encoder: p x p patches -> linear embedding (a stride-p convolution) + learned position embeddings -> pre-norm
  transformer blocks -> LayerNorm -> tokens [B, D, h, w] (h = w = R / p).
- Decoder: tokens -> linear + learned position embeddings -> pre-norm blocks -> LayerNorm -> a final linear
  projection of every token back to its p x p x 3 pixels.

The blocks are ``torch.nn.TransformerEncoderLayer`` with ``norm_first=True`` (pre-norm, GELU MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViTEncoder(nn.Module):
    def __init__(self, resolution: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.grid = resolution // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)  # a linear map of each flattened patch
        self.pos = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, D]
        h = self.norm(self.blocks(h))
        return h.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


class ViTDecoder(nn.Module):
    def __init__(self, resolution: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        self.grid, self.patch = resolution // patch, patch
        self.pos = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)
        self.to_pixels = nn.Linear(dim, 3 * patch * patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> images [B, 3, h p, w p]."""
        h = z.flatten(2).transpose(1, 2) + self.pos
        h = self.to_pixels(self.norm(self.blocks(h)))  # [B, N, 3 p p]
        b, g = z.shape[0], self.grid
        return F.pixel_shuffle(h.transpose(1, 2).reshape(b, 3 * self.patch**2, g, g), self.patch)
