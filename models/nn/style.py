"""Blocks of the style-based generators (StyleGAN, StyleGAN2): the mapping network with its tracked w_avg and
truncation, FIR up/down-sampling, modulated convolution with weight demodulation, noise inputs and AdaIN.

Everything is plain PyTorch: the FIR filter [1, 3, 3, 1] runs as a depthwise (transposed) convolution, so
there is no CUDA extension to compile (NVlabs' upfirdn2d / bias_act plugins are the most reported build
failures in their trackers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ganforge.models.nn.equalized import SQRT2, EqualizedLinear


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------- the mapping network


class MappingNetwork(nn.Module):
    """z (pixel-normalized) [+ an embedded, normalized label] -> ``layers`` equalized FC layers at
    ``lr_mul`` -> w, broadcast to ``num_ws`` styles. ``w_avg`` tracks the mean w during training
    (``update_w_avg``); truncation lerps the styles of layers below ``cutoff`` toward it."""

    def __init__(self, z_dim: int, w_dim: int, layers: int = 8, lr_mul: float = 0.01, num_classes: int = 0,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes, self.w_avg_beta = z_dim, w_dim, num_classes, w_avg_beta
        self.embed = EqualizedLinear(num_classes, w_dim, gain=1.0) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.fcs = nn.ModuleList(EqualizedLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, update_w_avg: bool = False) -> torch.Tensor:
        x = normalize_2nd_moment(z.float())
        if self.embed is not None:
            if labels is None:
                raise ValueError("a class-conditional mapping network needs labels")
            y = normalize_2nd_moment(self.embed(F.one_hot(labels, self.num_classes).float()))
            x = torch.cat([x, y], dim=1)
        for fc in self.fcs:
            x = F.leaky_relu(fc(x), 0.2)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return x

    def truncate(self, ws: torch.Tensor, psi: float, cutoff: int | None = None) -> torch.Tensor:
        """Styles [N, num_ws, w_dim] with layers < ``cutoff`` (all: None) moved toward w_avg: w_avg + psi (w - w_avg)."""
        if psi == 1.0:
            return ws
        out = ws.clone()
        k = ws.shape[1] if cutoff is None else cutoff
        out[:, :k] = self.w_avg.to(ws.dtype).lerp(ws[:, :k], psi)
        return out


def mix_styles(ws: torch.Tensor, ws2: torch.Tensor, cutoff: int) -> torch.Tensor:
    """Styles of ``ws`` for layers < cutoff (coarse) and of ``ws2`` from ``cutoff`` on (fine)."""
    return torch.cat([ws[:, :cutoff], ws2[:, cutoff:]], dim=1)


# ----------------------------------------------------------------------------- FIR resampling


class FIR(nn.Module):
    """Up/down-sampling by 2 with the separable FIR filter [1, 3, 3, 1] (normalized), in pure PyTorch: the
    zero-insertion upsample + filter of upfirdn2d is a depthwise transposed convolution with stride 2, and
    filter + decimation a depthwise convolution with stride 2 (same padding as NVlabs' up=2 / down=2)."""

    def __init__(self, taps: tuple[float, ...] = (1, 3, 3, 1)):
        super().__init__()
        k = torch.tensor(taps, dtype=torch.float32)
        f = torch.outer(k, k)
        self.register_buffer("f", f / f.sum(), persistent=False)

    def _weight(self, x: torch.Tensor, gain: float) -> torch.Tensor:
        return (self.f * gain).to(x.dtype)[None, None].expand(x.shape[1], 1, *self.f.shape)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self._weight(x, 4.0), stride=2, padding=1, groups=x.shape[1])

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._weight(x, 1.0), stride=2, padding=1, groups=x.shape[1])


# ----------------------------------------------------------------------------- modulated convolution


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0) -> torch.Tensor:
    """StyleGAN2's modulated convolution: the weight scaled per input channel by each sample's style and, with
    ``demodulate``, renormalized per output channel so that unit-variance inputs give unit-variance outputs.

    Computed as scale inputs -> shared convolution -> scale outputs (NVlabs' non-fused path), which equals the
    per-sample weight w'_ijk = s_i w_ijk / sqrt(sum_ik (s_i w_ijk)^2) and needs no grouped convolution."""
    dcoefs = None
    if demodulate:
        wsq = weight.float().square().sum(dim=(2, 3))  # [O, I]
        dcoefs = (styles.float().square() @ wsq.t() + 1e-8).rsqrt()  # [N, O]
    x = x * styles.to(x.dtype)[:, :, None, None]
    x = F.conv2d(x, weight.to(x.dtype), padding=padding)
    if dcoefs is not None:
        x = x * dcoefs.to(x.dtype)[:, :, None, None]
    return x


class NoiseInput(nn.Module):
    """Per-pixel Gaussian noise with a learned strength (per channel in StyleGAN, a scalar in StyleGAN2; zero at
    init). ``noise='random'`` draws fresh noise from ``generator``; ``'const'`` uses this layer's fixed noise
    (a buffer, in checkpoints), so that an image depends only on its seed; ``'none'`` adds nothing."""

    def __init__(self, resolution: int, channels: int = 1):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels))
        self.register_buffer("const", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor, noise: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
        if noise == "none":
            return x
        if noise == "const":
            n = self.const.to(x.dtype)
        else:
            n = torch.randn((x.shape[0], 1, *x.shape[2:]), generator=generator).to(device=x.device, dtype=x.dtype)
        return x + n * self.strength.to(x.dtype).view(1, -1, 1, 1)


class AdaIN(nn.Module):
    """Adaptive instance normalization (StyleGAN v1): instance-normalize, then scale and shift per channel by
    a learned affine transform of the style (scale initialised around 1)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, 2 * channels, gain=1.0)
        with torch.no_grad():
            self.affine.bias[:channels].fill_(1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(w).to(x.dtype).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return F.instance_norm(x, eps=1e-8) * scale + shift


def act(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (0.2) with the He gain sqrt(2), as NVlabs' bias_act 'lrelu'."""
    return F.leaky_relu(x, 0.2) * SQRT2


def log2(n: int) -> int:
    return int(round(math.log2(n)))
