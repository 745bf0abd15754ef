"""The ResNet image-to-image generator of Johnson et al. 2016 as pytorch-CycleGAN-and-pix2pix builds it
(``ResnetGenerator``): c7s1-ngf, two stride-2 down-convolutions (d2ngf, d4ngf), ``n_blocks`` residual blocks
at 4 ngf, two stride-2 up-convolutions back to ngf, c7s1-3 and tanh; reflection padding, instance norm (no
affine), ReLU, weights from N(0, 0.02)."""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(ch)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    raise ValueError(f"norm must be instance or batch, got {kind!r}")


class ResnetBlock(nn.Module):
    """x + (pad, conv3, norm, ReLU, [dropout], pad, conv3, norm)(x)."""

    def __init__(self, ch: int, norm: str = "instance", dropout: float = 0.0):
        super().__init__()
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=bias), _norm(norm, ch),
                                   nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=bias), _norm(norm, ch)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Images in [-1, 1] -> images in [-1, 1] of the same size (a multiple of 4, at least 8)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, norm: str = "instance", dropout: float = 0.0,
                 channels: int = 3):
        super().__init__()
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7, bias=bias), _norm(norm, ngf),
                                   nn.ReLU(True)]
        for i in range(2):  # down: ngf -> 2 ngf -> 4 ngf
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=bias), _norm(norm, 2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(4 * ngf, norm, dropout) for _ in range(n_blocks)]
        for i in range(2):  # up: 4 ngf -> 2 ngf -> ngf
            c = ngf * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=bias), _norm(norm, c // 2),
                       nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        for m in self.modules():  # the reference's init_type "normal", gain 0.02
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
