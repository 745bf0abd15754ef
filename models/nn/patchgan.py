"""PatchGAN discriminator (pix2pix; taming-transformers' NLayerDiscriminator): one real/fake logit per patch.

Used by VQ-GAN's autoencoder stage (batch norm, as taming) and by CycleGAN (instance norm, as
pytorch-CycleGAN-and-pix2pix; n_layers = 3 is the 70x70 PatchGAN).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): a grid of real/fake logits, one per patch."""

    def __init__(self, ch: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "instance"):
            raise ValueError(f"PatchGAN norm must be batch or instance, got {norm!r}")
        # instance norm (no affine, as the reference) leaves the bias to the convolution
        norm_layer = nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=norm == "instance"),
                       norm_layer(ch * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init; pytorch-CycleGAN-and-pix2pix's also zeroes conv biases
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None and norm == "instance":
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def patch_grid(resolution: int, n_layers: int) -> tuple[int, int]:
    """(side of the smallest normalised feature map, side of the logit grid) of a PatchGAN on ``resolution``
    images: instance norm needs the first > 1, and a logit needs the second >= 1."""
    side = resolution // 2**n_layers
    return side - 1, side - 2
