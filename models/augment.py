"""Augmentations applied to what the discriminator sees, chosen by ``train.augment``.

A family's step passes real and generated images alike through :meth:`GANFamily.d_input` (the same policy,
fresh randomness from the step's generator), so every family gets the same switch:

- ``none``;
- ``diffaugment``: DiffAugment (Zhao et al. 2020), differentiable color, translation and cutout, always on;
- ``ada``: adaptive discriminator augmentation (Karras et al. 2020): x-flip, 90-degree rotations, integer
  translation, general geometric transforms (isotropic and anisotropic scaling, rotation, fractional
  translation), color transforms (brightness, contrast, luma flip, hue, saturation) and cutout, each applied
  to an image with probability p; p moves toward the target r_t = E[sign(D(real))] (``train.ada``);
- ``diffusion``: Diffusion-GAN (Wang et al. 2022): real and fake images are diffused by the forward process
  x_t = sqrt(abar_t) x + sqrt(1 - abar_t) sigma eps, t drawn up to T, and D sees t beside the image (extra
  input channels); T moves with the overfitting signal r_d = E[sign(D(real))] (``train.diffusion``).

The adaptive ones are stateful (:class:`Augmenter`): p or T is part of the family state in every checkpoint,
so a resumed run continues with the same value, and it is logged with every metric row.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

Tensor = torch.Tensor
AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {}  # the stateless policies
ALL_AUGMENTATIONS = ("none", "diffaugment", "ada", "diffusion")  # train.augment's choices


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


# ----------------------------------------------------------------------------- the adaptive ones: params


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdaParams(_Section):
    """ADA (train.augment: ada): the probability p of every transform is tuned toward ``target``."""

    target: float = Field(0.6, gt=0, lt=1, description="r_t = E[sign(D(real))] that p is tuned toward")
    interval: int = Field(4, ge=1, description="discriminator steps between adjustments of p")
    kimg: float = Field(500.0, gt=0, description="speed: thousands of images for p to move by 1 (NVlabs: 500; "
                                                 "short runs need less)")
    p_init: float = Field(0.0, ge=0, le=1, description="p at the start of training")
    xflip: float = Field(1.0, ge=0, description="probability multiplier of x-flips")
    rotate90: float = Field(1.0, ge=0, description="of 90-degree rotations")
    xint: float = Field(1.0, ge=0, description="of integer translations (up to 1/8 of the size)")
    scale: float = Field(1.0, ge=0, description="of isotropic scaling (lognormal, std 0.2 octaves)")
    rotate: float = Field(1.0, ge=0, description="of arbitrary rotations")
    aniso: float = Field(1.0, ge=0, description="of anisotropic scaling (std 0.2 octaves)")
    xfrac: float = Field(1.0, ge=0, description="of fractional translations (std 1/8 of the size)")
    brightness: float = Field(1.0, ge=0, description="of brightness shifts (std 0.2)")
    contrast: float = Field(1.0, ge=0, description="of contrast scaling (std 0.5 octaves)")
    lumaflip: float = Field(1.0, ge=0, description="of luma flips")
    hue: float = Field(1.0, ge=0, description="of hue rotations")
    saturation: float = Field(1.0, ge=0, description="of saturation scaling (std 1 octave)")
    cutout: float = Field(0.0, ge=0, description="of cutout (a zeroed square of half the size); 0: the paper's "
                                                 "default pipeline (bgc)")


class DiffusionParams(_Section):
    """Diffusion-GAN (train.augment: diffusion): the forward process before D, its length T adaptive."""

    beta_start: float = Field(1e-4, gt=0, lt=1, description="linear beta schedule over T steps: first beta")
    beta_end: float = Field(2e-2, gt=0, lt=1, description="last beta")
    t_min: int = Field(5, ge=1, description="smallest T")
    t_max: int = Field(1000, ge=1, description="largest T (1000 with beta_end 0.02 and sigma 0.05, as the reference's "
                                               "diffusion-stylegan2: at T the image is hidden, SNR 0.13)")
    t_init: int | None = Field(None, ge=1, description="T at the start; null: t_min")
    sigma: float = Field(0.05, gt=0, description="noise scale sigma of the forward process")
    t_dist: Literal["priority", "uniform"] = Field(
        "priority", description="t of a diffused image: priority (p(t) proportional to t) or uniform on 1..T")
    clean_fraction: float = Field(0.5, ge=0, lt=1, description="share of D's images left at t = 0 (as the "
                                                               "reference's half-zero timestep pool)")
    target: float = Field(0.6, gt=0, lt=1, description="r_d = E[sign(D(real))] that T is tuned toward")
    interval: int = Field(4, ge=1, description="discriminator steps between adjustments of T")
    kimg: float = Field(100.0, gt=0, description="speed: thousands of images for T to cross t_min..t_max")
    t_channels: int = Field(4, ge=1, le=16, description="channels of D's input that carry t (a fixed "
                                                        "embedding of t / t_max)")


def check_augment(train: Any) -> None:
    """Cross-checks of train.augment against its sections (ValueError, one line)."""
    d = train.diffusion
    if d.t_min > d.t_max:
        raise ValueError(f"train.diffusion.t_min ({d.t_min}) must be <= train.diffusion.t_max ({d.t_max})")
    if d.t_init is not None and not d.t_min <= d.t_init <= d.t_max:
        raise ValueError(f"train.diffusion.t_init ({d.t_init}) must be in [t_min, t_max] = [{d.t_min}, {d.t_max}]")
    if d.beta_start > d.beta_end:
        raise ValueError(f"train.diffusion.beta_start ({d.beta_start:g}) must be <= beta_end ({d.beta_end:g})")


# ----------------------------------------------------------------------------- ADA: the pipeline


def _bernoulli(n: int, p: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator) < p


class _Coins:
    """Per-image Bernoulli draws (is a transform on for image i?) that remember whether any came up."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.any = n, generator, False

    def __call__(self, prob: float) -> Tensor:
        m = _bernoulli(self.n, prob, self.generator)
        self.any = self.any or bool(m.any())
        return m


def _mat(n: int, size: int = 3) -> Tensor:
    return torch.eye(size).repeat(n, 1, 1)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    m = _mat(len(tx))
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    m = _mat(len(sx))
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _rotate(theta: Tensor) -> Tensor:
    m = _mat(len(theta))
    c, s = torch.cos(theta), torch.sin(theta)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, -s, s, c
    return m


def _gate(on: Tensor, value: Tensor, identity: float) -> Tensor:
    return torch.where(on, value, torch.full_like(value, identity))


def ada_geometric(n: int, size: int, p: float, a: AdaParams, generator: torch.Generator) -> Tensor | None:
    """Per-image 3x3 matrices (normalized coordinates, output -> input) of the geometric transforms, each on with
    probability p x its multiplier, for square images of ``size`` pixels; None when none is on for any image."""
    g = generator
    mats, on = _mat(n), _Coins(n, g)

    def rand(*shape) -> Tensor:
        return torch.rand(shape if shape else (n,), generator=g)

    def randn(*shape) -> Tensor:
        return torch.randn(shape if shape else (n,), generator=g)

    if a.xflip:  # pixel blitting: exact on the pixel grid
        mats = mats @ _scale(_gate(on(p * a.xflip), 1 - 2 * torch.floor(rand() * 2), 1.0), torch.ones(n))
    if a.rotate90:
        mats = mats @ _rotate(_gate(on(p * a.rotate90), -math.pi / 2 * torch.floor(rand() * 4), 0.0))
    if a.xint:  # up to 1/8 of the size, in whole pixels (2 / size in normalized coordinates)
        t = torch.round((rand(n, 2) * 2 - 1) * 0.125 * size) * 2 / size
        o = on(p * a.xint)
        mats = mats @ _translate(_gate(o, t[:, 0], 0.0), _gate(o, t[:, 1], 0.0))
    if a.scale:
        s = _gate(on(p * a.scale), torch.exp2(randn() * 0.2), 1.0)
        mats = mats @ _scale(s, s)
    p_rot = 1 - math.sqrt(max(0.0, 1 - min(p * a.rotate, 1.0)))  # applied twice (around aniso), as NVlabs
    if a.rotate:
        mats = mats @ _rotate(_gate(on(p_rot), (rand() * 2 - 1) * math.pi, 0.0))
    if a.aniso:
        s = _gate(on(p * a.aniso), torch.exp2(randn() * 0.2), 1.0)
        mats = mats @ _scale(s, 1 / s)
    if a.rotate:
        mats = mats @ _rotate(_gate(on(p_rot), (rand() * 2 - 1) * math.pi, 0.0))
    if a.xfrac:  # std 1/8 of the size
        t = randn(n, 2) * 0.125 * 2
        o = on(p * a.xfrac)
        mats = mats @ _translate(_gate(o, t[:, 0], 0.0), _gate(o, t[:, 1], 0.0))
    return mats if on.any else None


_LUMA = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)  # the luma axis of the color transforms (as NVlabs)


def ada_color(n: int, p: float, a: AdaParams, generator: torch.Generator) -> Tensor | None:
    """Per-image 3x4 affine color matrices [M | b] (x -> M x + b on RGB in [-1, 1]); None when none is on."""
    g = generator
    m, b, on = torch.eye(3).repeat(n, 1, 1), torch.zeros(n, 3), _Coins(n, g)
    v = _LUMA
    vv = torch.outer(v, v)

    if a.brightness:
        b = b + _gate(on(p * a.brightness), torch.randn(n, generator=g) * 0.2, 0.0)[:, None]
    if a.contrast:
        c = _gate(on(p * a.contrast), torch.exp2(torch.randn(n, generator=g) * 0.5), 1.0)
        m, b = m * c[:, None, None], b * c[:, None]
    if a.lumaflip:  # Householder reflection along the luma axis
        i = _gate(on(p * a.lumaflip), torch.floor(torch.rand(n, generator=g) * 2), 0.0)
        f = torch.eye(3) - 2 * vv * i[:, None, None]
        m, b = f @ m, (f @ b[:, :, None])[:, :, 0]
    if a.hue:  # rotation about the luma axis (Rodrigues)
        th = _gate(on(p * a.hue), (torch.rand(n, generator=g) * 2 - 1) * math.pi, 0.0)
        k = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
        r = (torch.eye(3) + torch.sin(th)[:, None, None] * k + (1 - torch.cos(th))[:, None, None] * (k @ k))
        m, b = r @ m, (r @ b[:, :, None])[:, :, 0]
    if a.saturation:  # scale away from the luma axis
        s = _gate(on(p * a.saturation), torch.exp2(torch.randn(n, generator=g) * 1.0), 1.0)
        t = vv + (torch.eye(3) - vv) * s[:, None, None]
        m, b = t @ m, (t @ b[:, :, None])[:, :, 0]
    return torch.cat([m, b[:, :, None]], dim=2) if on.any else None


def _reflect(p: Tensor, size: int) -> Tensor:
    """Pixel coordinates reflected about the image's edges (-0.5 and size - 0.5), then clipped to [0, size - 1]:
    grid_sample's ``padding_mode="reflection"`` with ``align_corners=False``."""
    q = (p + 0.5).abs()
    flips = torch.floor(q / size)
    extra = q - flips * size
    q = torch.where(flips.remainder(2) == 0, extra, size - extra) - 0.5
    return q.clamp(0, size - 1)


def _apply_geometric(x: Tensor, mats: Tensor) -> Tensor:
    """Resample ``x`` at the transformed grid: bilinear, reflected at the borders, as ``F.grid_sample`` (align_corners
    False) computes it, but from gathers, so it is differentiable twice w.r.t. ``x``: R1 and gradient penalties
    differentiate through it (CUDA's grid_sample has no double backward; NVlabs wrote a custom op for this).
    Flips, 90-degree rotations and whole-pixel translations land on pixel centres, so they move pixels exactly."""
    n, c, h, w = x.shape
    grid = F.affine_grid(mats[:, :2, :].to(x.device, torch.float32), [n, c, h, w], align_corners=False)
    px = _reflect(((grid[..., 0] + 1) * w - 1) / 2, w)  # [N, H, W] source pixel coordinates
    py = _reflect(((grid[..., 1] + 1) * h - 1) / 2, h)
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0).to(x.dtype), (py - y0).to(x.dtype)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = x.reshape(n, c, h * w)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return torch.gather(flat, 2, (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)

    fx, fy = fx[:, None], fy[:, None]
    return ((at(y0, x0) * (1 - fx) + at(y0, x1) * fx) * (1 - fy) + (at(y1, x0) * (1 - fx) + at(y1, x1) * fx) * fy)


def _normal(shape, generator: torch.Generator, device) -> Tensor:
    """N(0, 1) noise decided by the step's (CPU) generator: drawn on the CPU for a CPU tensor; on a GPU, by a
    device generator seeded from it (drawing millions of values on the CPU and copying them would dominate)."""
    if torch.device(device).type == "cpu":
        return torch.randn(shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)


def ada_augment(x: Tensor, p: float, a: AdaParams, generator: torch.Generator) -> Tensor:
    """ADA's pipeline at probability ``p`` (geometric, then color, then cutout); ``x`` itself when p = 0."""
    if p <= 0:
        return x
    n, c, h, w = x.shape
    mats = ada_geometric(n, h, p, a, generator)
    if mats is not None:
        x = _apply_geometric(x, mats)
    col = ada_color(n, p, a, generator)
    if col is not None and c == 3:
        x = torch.einsum("nij,njhw->nihw", col[:, :, :3].to(x), x) + col[:, :, 3, None, None].to(x)
    if a.cutout:
        o = _bernoulli(n, p * a.cutout, generator).to(x.device)
        centre = torch.rand(n, 2, generator=generator).to(x.device)
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        inside = (((ys[None, :, None] - centre[:, 0, None, None]).abs() < 0.25)
                  & ((xs[None, None, :] - centre[:, 1, None, None]).abs() < 0.25))
        x = x * (~(inside & o[:, None, None])).to(x.dtype)[:, None]
    return x


# ----------------------------------------------------------------------------- Diffusion-GAN: the forward process


def alpha_bars(t: int, beta_start: float, beta_end: float) -> Tensor:
    """abar_0..abar_T of a linear beta schedule over T steps (abar_0 = 1: t = 0 is the clean image)."""
    betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def diffuse(x: Tensor, t: Tensor, abar: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) sigma eps, per image (t: int64 [N])."""
    a = abar[t].to(x.device, x.dtype)[:, None, None, None]
    eps = _normal(x.shape, generator, x.device).to(x.dtype)
    return a.sqrt() * x + (1 - a).sqrt() * sigma * eps


def t_embedding(t: Tensor, t_max: int, channels: int) -> Tensor:
    """A fixed embedding of t / t_max in [0, 1]: [2u - 1, sin(pi u), cos(pi u), sin(2 pi u), cos(2 pi u), ...]."""
    u = t.double() / t_max
    feats = [2 * u - 1]
    k = 1
    while len(feats) < channels:
        feats += [torch.sin(math.pi * k * u), torch.cos(math.pi * k * u)]
        k += 1
    return torch.stack(feats[:channels], dim=1).float()


# ----------------------------------------------------------------------------- the stateful augmenters


class Augmenter:
    """What :meth:`GANFamily.d_input` applies. Stateless policies wrap a function; the adaptive ones keep their
    strength (p, T) and the overfitting signal, updated from :meth:`feedback` with D's outputs on real images."""

    adaptive = False
    extra_channels = 0  # input channels D needs beside the image's 3 (Diffusion-GAN: t)

    def __init__(self, kind: str, batch_size: int):
        self.kind, self.batch_size = kind, batch_size

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return AUGMENTATIONS[self.kind](x, generator)

    def feedback(self, real_logits: Tensor) -> None:
        """D's outputs on real images, positive meaning 'real' (once per discriminator step)."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Adaptive(Augmenter):
    """Strength s in [0, 1], moved every ``interval`` discriminator steps by sign(r - target) x batch x interval /
    (kimg x 1000), r = E[sign(D(real))] over those steps and every worker (NVlabs' rule)."""

    adaptive = True

    def __init__(self, kind: str, batch_size: int, section: Any, strength: float):
        super().__init__(kind, batch_size)
        self.section = section
        self.strength = float(strength)
        self.sign_sum = self.count = 0.0
        self.calls = 0
        self.signal = float("nan")  # the last r

    def feedback(self, real_logits: Tensor) -> None:
        import torch.distributed as dist

        r = real_logits.detach()
        acc = torch.stack([torch.sign(r.double()).sum(), torch.tensor(float(r.numel()), dtype=torch.float64,
                                                                          device=r.device)])
        if dist.is_available() and dist.is_initialized():  # every rank holds the same sums (and so the same s)
            dist.all_reduce(acc)  # on the logits' device: NCCL takes CUDA tensors only
        acc = acc.cpu()
        self.sign_sum += float(acc[0])
        self.count += float(acc[1])
        self.calls += 1
        if self.calls % self.section.interval == 0 and self.count:
            self.signal = self.sign_sum / self.count
            step = self.batch_size * self.section.interval / (self.section.kimg * 1000)
            direction = (self.signal > self.section.target) - (self.signal < self.section.target)
            self.strength = min(1.0, max(0.0, self.strength + direction * step))
            self.sign_sum = self.count = 0.0
            self.adjusted()

    def adjusted(self) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"kind": self.kind, "strength": self.strength, "sign_sum": self.sign_sum, "count": self.count,
                "calls": self.calls, "signal": self.signal}

    def load_state_dict(self, state: dict) -> None:
        if not state or state.get("kind") != self.kind:  # another policy (or none) before: start afresh
            return
        self.strength = float(state["strength"])
        self.sign_sum, self.count = float(state["sign_sum"]), float(state["count"])
        self.calls, self.signal = int(state["calls"]), float(state["signal"])
        self.adjusted()


class AdaAugmenter(_Adaptive):
    def __init__(self, batch_size: int, section: AdaParams):
        super().__init__("ada", batch_size, section, section.p_init)

    @property
    def p(self) -> float:
        return self.strength

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return ada_augment(x, self.p, self.section, generator)

    def metrics(self) -> dict[str, float]:
        return {"ada_p": self.p, **({} if math.isnan(self.signal) else {"ada_rt": self.signal})}


class DiffusionAugmenter(_Adaptive):
    def __init__(self, batch_size: int, section: DiffusionParams):
        d = section
        t0 = d.t_init if d.t_init is not None else d.t_min
        super().__init__("diffusion", batch_size, section, (t0 - d.t_min) / max(1, d.t_max - d.t_min))
        self.extra_channels = d.t_channels
        self.adjusted()

    def adjusted(self) -> None:
        d = self.section
        self.T = int(round(d.t_min + self.strength * (d.t_max - d.t_min)))
        self.abar = alpha_bars(self.T, d.beta_start, d.beta_end)

    def timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        """t of each of n images: 0 with probability clean_fraction, else from 1..T (priority: p(t) ~ t)."""
        d = self.section
        ts = torch.arange(1, self.T + 1, dtype=torch.float64)
        w = ts if d.t_dist == "priority" else torch.ones_like(ts)
        t = torch.multinomial(w, n, replacement=True, generator=generator) + 1
        clean = torch.rand(n, generator=generator) < d.clean_fraction
        return torch.where(clean, torch.zeros_like(t), t)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        t = self.timesteps(x.shape[0], generator)
        xt = diffuse(x, t, self.abar, self.section.sigma, generator)
        emb = t_embedding(t, self.section.t_max, self.extra_channels).to(x.device, x.dtype)
        return torch.cat([xt, emb[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)

    def metrics(self) -> dict[str, float]:
        return {"diffusion_T": float(self.T), **({} if math.isnan(self.signal) else {"diffusion_rd": self.signal})}


def make_augmenter(train: Any) -> Augmenter:
    """The augmenter ``train.augment`` names, with its section (train.ada / train.diffusion)."""
    kind = getattr(train, "augment", "none")
    batch = int(getattr(train, "batch_size", 1))
    if kind == "ada":
        return AdaAugmenter(batch, train.ada)
    if kind == "diffusion":
        return DiffusionAugmenter(batch, train.diffusion)
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(ALL_AUGMENTATIONS)}")
    return Augmenter(kind, batch)


ADAPTIVE_AUGMENTATIONS = ("ada", "diffusion")


def augment(kind: str, x: Tensor, generator: torch.Generator) -> Tensor:
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(AUGMENTATIONS)} (stateless)")
    return AUGMENTATIONS[kind](x, generator)
