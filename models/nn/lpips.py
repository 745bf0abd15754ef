"""LPIPS-VGG (Zhang et al. 2018) from local weight files; nothing is downloaded."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("ganforge.lpips")


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018) from local weights: a torchvision VGG16 state dict and the
    LPIPS linear heads (the ``lpips`` package's ``weights/v0.1/vgg.pth``, keys ``lin0.model.1.weight``..)."""

    _CUTS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path: str | Path, lin_path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        vgg = vgg16(weights=None)
        vgg.load_state_dict(torch.load(vgg_path, map_location="cpu", weights_only=True))
        self.features = vgg.features[: self._CUTS[-1]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self._CHANNELS)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False).eval()

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h, start = [], (x - self.shift) / self.scale, 0
        for cut in self._CUTS:
            h = self.features[start:cut](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] of images in [-1, 1]."""
        return sum(lin((fa - fb).pow(2)).mean((1, 2, 3)) for lin, fa, fb in zip(self.lins, self._feats(a), self._feats(b)))


def load_lpips(vgg_path: str | None, lin_path: str | None) -> tuple[LPIPS | None, str]:
    """(LPIPS, "enabled ...") or (None, the reason it is off)."""
    if not vgg_path or not lin_path:
        return None, ("disabled: train.vqgan.lpips_vgg_path / lpips_lin_path are not set (VGG weights cannot be "
                      "downloaded here); reconstruction loss is L1 only")
    for p in (vgg_path, lin_path):
        if not Path(p).exists():
            return None, f"disabled: {p} does not exist; reconstruction loss is L1 only"
    try:
        return LPIPS(vgg_path, lin_path), f"enabled: LPIPS-VGG from {vgg_path} + {lin_path}"
    except (RuntimeError, KeyError, OSError) as e:
        return None, f"disabled: cannot load LPIPS weights ({type(e).__name__}: {str(e)[:200]})"
