"""Layers shared by GAN families: equalized learning rate, pixel norm, minibatch stddev."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


class EqualizedConv2d(nn.Module):
    """Conv with weights stored N(0,1) and the He constant sqrt(gain^2/fan_in) applied at run time."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, gain: float = SQRT2, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = gain / math.sqrt(cin * kernel * kernel)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """Linear layer with the He constant applied at run time. ``lr_mul`` < 1 slows the layer's learning rate
    (StyleGAN's mapping network: 0.01): weights are stored N(0, 1/lr_mul^2) and scaled by lr_mul at run time,
    so Adam's steps move the effective weights lr_mul times as far. ``bias_init`` is the effective initial bias
    (StyleGAN's style affines start at 1)."""

    def __init__(self, cin: int, cout: int, gain: float = SQRT2, bias: bool = True, lr_mul: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), float(bias_init) / lr_mul)) if bias else None
        self.scale = gain * lr_mul / math.sqrt(cin)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias if self.bias is None or self.lr_mul == 1.0 else self.bias * self.lr_mul
        return F.linear(x, self.weight * self.scale, b)


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit length (ProGAN sec. 4.2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class MinibatchStd(nn.Module):
    """Append the average (over features and pixels) stddev across groups of samples as one feature map."""

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = math.gcd(min(self.group_size, n), n)
        y = x.reshape(g, -1, c, h, w).float()
        y = (y - y.mean(dim=0)).pow(2).mean(dim=0).add(1e-8).sqrt()  # [n/g, c, h, w]
        y = y.mean(dim=(1, 2, 3)).to(x.dtype)  # [n/g]
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # [n, 1, h, w]
        return torch.cat([x, y], dim=1)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t
