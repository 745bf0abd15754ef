"""Blocks of the class-conditional ResNet GANs (SAGAN, BigGAN): spectrally normalised layers, self-attention,
conditional BatchNorm, residual up/down blocks and the projection discriminator's head.

Spectral normalisation is torch's own parametrization (``torch.nn.utils.parametrizations.spectral_norm``): the
power-iteration vectors ``u``/``v`` are buffers, so they are in every state dict (checkpoints, EMA copies) and
a resumed run continues the same iteration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def sn(module: nn.Module, enabled: bool = True, eps: float = 1e-6) -> nn.Module:
    return spectral_norm(module, eps=eps) if enabled else module


def sn_conv(cin: int, cout: int, k: int = 3, p: int = 1, enabled: bool = True) -> nn.Module:
    return sn(nn.Conv2d(cin, cout, k, 1, p), enabled)


def sn_linear(cin: int, cout: int, enabled: bool = True, bias: bool = True) -> nn.Module:
    return sn(nn.Linear(cin, cout, bias=bias), enabled)


class SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al. 2018): theta/phi/g 1x1 convs, phi and g max-pooled 2x (as in
    BigGAN), output o = x + gamma * v(softmax(theta^T phi) g) with the learned gamma starting at 0 (the
    identity)."""

    def __init__(self, ch: int, use_sn: bool = True):
        super().__init__()
        self.ch = ch
        self.theta = sn(nn.Conv2d(ch, max(1, ch // 8), 1, bias=False), use_sn)
        self.phi = sn(nn.Conv2d(ch, max(1, ch // 8), 1, bias=False), use_sn)
        self.g = sn(nn.Conv2d(ch, max(1, ch // 2), 1, bias=False), use_sn)
        self.o = sn(nn.Conv2d(max(1, ch // 2), ch, 1, bias=False), use_sn)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [n, c/8, hw]
        pool = (h * w) % 4 == 0 and h > 1 and w > 1
        phi = self.phi(x)
        g = self.g(x)
        if pool:
            phi, g = F.max_pool2d(phi, 2), F.max_pool2d(g, 2)
        phi, g = phi.flatten(2), g.flatten(2)
        beta = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # [n, hw, hw/4]
        o = (g @ beta.transpose(1, 2)).view(n, -1, h, w)
        return x + self.gamma * self.o(o)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, whose per-channel gain and bias come from a conditioning vector
    (BigGAN: [shared class embedding, z chunk]) through linear layers, or from a per-class embedding (SAGAN:
    ``cond_dim`` = 0, ``num_classes`` > 0). Gain is 1 + f(c)."""

    def __init__(self, ch: int, cond_dim: int = 0, num_classes: int = 0, use_sn: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=False, eps=1e-4, momentum=0.1)
        if cond_dim:
            self.gain = sn_linear(cond_dim, ch, use_sn, bias=False)
            self.bias = sn_linear(cond_dim, ch, use_sn, bias=False)
        elif num_classes:
            self.gain = nn.Embedding(num_classes, ch)
            self.bias = nn.Embedding(num_classes, ch)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        else:  # unconditional: plain learned affine
            self.gain = None
            self.affine_w = nn.Parameter(torch.zeros(ch))
            self.affine_b = nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if self.gain is None:
            g, b = self.affine_w[None], self.affine_b[None]
        else:
            g, b = self.gain(c), self.bias(c)
        return out * (1 + g)[:, :, None, None] + b[:, :, None, None]


class GBlock(nn.Module):
    """Residual up block: cBN -> ReLU -> up 2x -> conv3 -> cBN -> ReLU -> conv3, plus up 2x -> conv1 skip."""

    def __init__(self, cin: int, cout: int, cond_dim: int = 0, num_classes: int = 0, use_sn: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim, num_classes, use_sn)
        self.conv1 = sn_conv(cin, cout, enabled=use_sn)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim, num_classes, use_sn)
        self.conv2 = sn_conv(cout, cout, enabled=use_sn)
        self.skip = sn_conv(cin, cout, 1, 0, use_sn)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Residual down block (ReLU -> conv3 -> ReLU -> conv3 -> avgpool, plus conv1 -> avgpool skip); the first
    block of D skips the leading ReLU (it sees images)."""

    def __init__(self, cin: int, cout: int, down: bool = True, first: bool = False, use_sn: bool = True):
        super().__init__()
        self.conv1 = sn_conv(cin, cout, enabled=use_sn)
        self.conv2 = sn_conv(cout, cout, enabled=use_sn)
        self.skip = sn_conv(cin, cout, 1, 0, use_sn) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # pool before the 1x1 (as in the reference), cheaper at full resolution
            s = self.skip(F.avg_pool2d(s, 2) if self.down else s)
        elif self.skip is not None:
            s = self.skip(s)
            if self.down:
                s = F.avg_pool2d(s, 2)
        return h + s


class ProjectionHead(nn.Module):
    """The projection discriminator's output (Miyato & Koyama 2018): psi(h) + <embed(y), h> on the globally
    sum-pooled features h."""

    def __init__(self, ch: int, num_classes: int, use_sn: bool = True):
        super().__init__()
        self.linear = sn_linear(ch, 1, use_sn)
        self.embed = sn(nn.Embedding(num_classes, ch), use_sn) if num_classes else None

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a projection discriminator needs labels")
            out = out + (self.embed(labels) * h).sum(1, keepdim=True)
        return out


def truncated_normal(shape: tuple[int, ...], threshold: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) draws with every value beyond +-threshold resampled until inside (BigGAN's truncation trick; not
    scaled)."""
    if threshold <= 0:
        raise ValueError(f"truncation threshold must be > 0, got {threshold}")
    z = torch.randn(shape, generator=generator)
    bad = z.abs() > threshold
    while bool(bad.any()):
        z[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = z.abs() > threshold
    return z
