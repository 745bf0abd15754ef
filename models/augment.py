"""Augmentations applied to what the discriminator sees, registered by name.

A family's step calls :func:`augment` on real and generated images alike (the same policy, fresh randomness
from the step's generator), so every family gets the same switch: ``none`` or ``diffaugment`` (DiffAugment,
Zhao et al. 2020: differentiable color, translation and cutout). ADA and Diffusion-GAN noise register here too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {}


def register_augmentation(name: str):
    def deco(fn):
        AUGMENTATIONS[name] = fn
        return fn
    return deco


@register_augmentation("none")
def _identity(x: Tensor, generator: torch.Generator) -> Tensor:
    return x


def _rand(shape, generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)


@register_augmentation("diffaugment")
def diffaugment(x: Tensor, generator: torch.Generator, translation: float = 0.125, cutout: float = 0.5) -> Tensor:
    """DiffAugment's color + translation + cutout policy; differentiable w.r.t. ``x``."""
    n, _, h, w = x.shape
    dev = x.device
    # color: brightness, saturation, contrast
    x = x + (_rand((n, 1, 1, 1), generator, dev) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), generator, dev) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), generator, dev) + 0.5) + mean
    # translation by up to `translation` of the size, zero padded
    sx, sy = int(h * translation + 0.5), int(w * translation + 0.5)
    tx = (torch.randint(-sx, sx + 1, (n, 1, 1), generator=generator)).to(dev)
    ty = (torch.randint(-sy, sy + 1, (n, 1, 1), generator=generator)).to(dev)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(h, device=dev), torch.arange(w, device=dev),
                                indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    # cutout: one zeroed square of `cutout` of the size
    ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=generator).to(dev)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=generator).to(dev)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(ch, device=dev),
                                torch.arange(cw, device=dev), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=dev)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def augment(kind: str, x: Tensor, generator: torch.Generator) -> Tensor:
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[kind](x, generator)
