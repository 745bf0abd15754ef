"""ProGAN (Karras et al. 2017, "Progressive Growing of GANs"): networks, fade-in, losses, stages.

Each stage trains at one resolution. A stage at R > start holds the blocks for
4..R plus the toRGB/fromRGB layers of R and R/2; during its transition phase the
new block is blended with the up-/down-sampled old path with alpha rising 0->1,
then it stabilises at alpha = 1. The blend is always computed (at alpha = 1 the
old path contributes exact zeros), so every parameter takes part in every step
and DDP needs no unused-parameter search.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import Literal

from pydantic import Field

from ganforge.models import losses, regularizers
from ganforge.models.family import Betas, GANFamily, Pow2, Section, StageSpec, StepContext
from ganforge.models.nn.equalized import SQRT2, EqualizedConv2d, EqualizedLinear, MinibatchStd, PixelNorm


class ProGANParams(Section):
    """ProGAN: progressive stages start_resolution -> train.resolution, each with fade-in."""

    start_resolution: Pow2 = Field(4, ge=4, description="first stage's resolution (power of two)")
    latent_dim: int = Field(128, ge=1)
    fmap_base: int = Field(2048, ge=8, description="channels at 4x4 before the cap; halves per doubling")
    fmap_max: int = Field(128, ge=4, description="channel cap (512 in the paper; small for laptops)")
    fmap_min: int = Field(16, ge=1)
    transition_kimg: float = Field(4.0, ge=0, description="thousands of images over which alpha rises 0->1")
    stabilize_kimg: float = Field(4.0, gt=0, description="thousands of images at alpha=1 after the transition")
    loss: Literal["wgan-gp", "logistic-r1"] = Field(
        "wgan-gp", description="wgan-gp: Wasserstein + gradient penalty + drift; logistic-r1: non-saturating + R1")
    lr: float = Field(1e-3, gt=0)
    betas: Betas = (0.0, 0.99)
    gp_lambda: float = Field(10.0, ge=0)
    drift: float = Field(0.001, ge=0, description="epsilon-drift penalty on D(real)^2")
    r1_gamma: float = Field(10.0, ge=0)
    minibatch_std_group: int = Field(4, ge=1)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def channel_schedule(fmap_base: int, fmap_max: int, fmap_min: int):
    def nf(res: int) -> int:
        return int(min(max(fmap_base * 4 // res, fmap_min), fmap_max))

    return nf


def _resolutions(resolution: int) -> list[int]:
    return [2**i for i in range(2, int(math.log2(resolution)) + 1)]


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = EqualizedConv2d(cin, cout, 3, 1)
        self.conv2 = EqualizedConv2d(cout, cout, 3, 1)
        self.norm = PixelNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(_act(self.conv1(x)))
        return self.norm(_act(self.conv2(x)))


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = EqualizedConv2d(cin, cin, 3, 1)
        self.conv2 = EqualizedConv2d(cin, cout, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act(self.conv2(_act(self.conv1(x))))
        return F.avg_pool2d(x, 2)


class Generator(nn.Module):
    def __init__(self, resolution: int, latent_dim: int, nf, num_classes: int = 0):
        super().__init__()
        self.resolution, self.latent_dim = resolution, latent_dim
        self.res = _resolutions(resolution)
        c4 = nf(4)
        self.c4 = c4
        self.norm = PixelNorm()
        self.dense = EqualizedLinear(latent_dim, c4 * 16, gain=SQRT2 / 4)
        self.conv4 = EqualizedConv2d(c4, c4, 3, 1)
        self.blocks = nn.ModuleDict({str(r): GBlock(nf(r // 2), nf(r)) for r in self.res[1:]})
        keep = self.res[-2:]
        self.to_rgb = nn.ModuleDict({str(r): EqualizedConv2d(nf(r), 3, 1, gain=1.0) for r in keep})

    def forward(self, z: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        x = self.dense(self.norm(z)).view(-1, self.c4, 4, 4)
        x = self.norm(_act(x))
        x = self.norm(_act(self.conv4(x)))
        prev = x
        for r in self.res[1:]:
            prev, x = x, self.blocks[str(r)](x)
        y = self.to_rgb[str(self.resolution)](x)
        if len(self.res) > 1:
            y_old = F.interpolate(self.to_rgb[str(self.resolution // 2)](prev), scale_factor=2, mode="nearest")
            y = torch.lerp(y_old, y, alpha)
        return y


class Discriminator(nn.Module):
    def __init__(self, resolution: int, nf, mbstd_group: int = 4):
        super().__init__()
        self.resolution = resolution
        self.res = _resolutions(resolution)
        c4 = nf(4)
        keep = self.res[-2:]
        self.from_rgb = nn.ModuleDict({str(r): EqualizedConv2d(3, nf(r), 1) for r in keep})
        self.blocks = nn.ModuleDict({str(r): DBlock(nf(r), nf(r // 2)) for r in self.res[1:]})
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv4 = EqualizedConv2d(c4 + 1, c4, 3, 1)
        self.fc = EqualizedLinear(c4 * 16, c4)
        self.out = EqualizedLinear(c4, 1, gain=1.0)

    def forward(self, img: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        R = self.resolution
        x = _act(self.from_rgb[str(R)](img))
        if R > 4:
            x = self.blocks[str(R)](x)
            x_old = _act(self.from_rgb[str(R // 2)](F.avg_pool2d(img, 2)))
            x = torch.lerp(x_old, x, alpha)
            for r in reversed(self.res[1:-1]):
                x = self.blocks[str(r)](x)
        x = _act(self.conv4(self.mbstd(x)))
        x = _act(self.fc(x.flatten(1)))
        return self.out(x)


def fade_reals(real: torch.Tensor, alpha: float) -> torch.Tensor:
    """Blend real images with their 2x box-down/nearest-up version, as the generator's output is blended."""
    if alpha >= 1.0 or real.shape[-1] <= 4:
        return real
    low = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")
    return torch.lerp(low, real, alpha)


class ProGAN(GANFamily):
    name = "progan"
    contract_overrides = {"fmap_base": 32, "fmap_max": 8, "fmap_min": 4,
                          "latent_dim": 8}
    contract_variants = {"logistic-r1": {"loss": "logistic-r1"}}
    Params = ProGANParams
    ema_modules = ("G",)
    stage_prefix = "progan"  # stages are <prefix>-r<resolution> (StyleGAN v1 reuses this plan as stylegan-r...)

    def __init__(self, params):
        super().__init__(params)
        self.latent_dim = self.p.latent_dim
        self.nf = channel_schedule(self.p.fmap_base, self.p.fmap_max, self.p.fmap_min)

    @classmethod
    def check_params(cls, train, section: ProGANParams) -> None:
        if section.start_resolution > train.resolution:
            raise ValueError(f"train.{cls.name}.start_resolution ({section.start_resolution}) exceeds "
                             f"train.resolution ({train.resolution})")

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        # the first stage only stabilises; later ones split K into transition + stabilisation
        return {"transition_kimg": kimg / 2, "stabilize_kimg": kimg / 2}

    def stages(self) -> list[StageSpec]:
        out = []
        for i, r in enumerate(_resolutions(self.params.resolution)):
            if r < self.p.start_resolution:
                continue
            idx = len(out)
            transition = 0.0 if idx == 0 else self.p.transition_kimg
            out.append(StageSpec(
                name=f"{self.stage_prefix}-r{r:04d}", index=idx, resolution=r, kimg=transition + self.p.stabilize_kimg,
                info={"transition_kimg": transition},
            ))
        return out

    def alpha(self, stage: StageSpec, images_in_stage: int) -> float:
        t = stage.info["transition_kimg"] * 1000
        return 1.0 if t <= 0 else min(1.0, images_in_stage / t)

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        return {
            "G": Generator(stage.resolution, self.p.latent_dim, self.nf),
            "D": Discriminator(stage.resolution, self.nf, self.p.minibatch_std_group),
        }

    def grow(self, modules, previous) -> None:
        # The previous stage's toRGB/fromRGB of R/4 has no place in this stage.
        trimmed = {
            name: {k: v for k, v in sd.items() if k in modules[name].state_dict()} for name, sd in previous.items()
        }
        super().grow(modules, trimmed)

    def optimizers(self, modules):
        return {
            name: torch.optim.Adam(modules[name].parameters(), lr=self.p.lr, betas=self.p.betas, eps=1e-8)
            for name in ("G", "D")
        }

    def discriminate(self, modules, stage, real, fake, labels=None):
        """D on real and fake images in two passes, as NVlabs' run_D does (its minibatch-std groups see one pass)."""
        return modules["D"](real, 1.0), modules["D"](fake, 1.0)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        G, D = modules["G"], modules["D"]
        p, dev, gen = self.p, ctx.device, ctx.generator
        adv = "wasserstein" if p.loss == "wgan-gp" else "non-saturating"
        alpha = self.alpha(stage, ctx.images_in_stage)
        real = batch["image"]
        n = real.shape[0]
        real = fade_reals(real, alpha)
        metrics: dict[str, float] = {"alpha": alpha}

        # --- discriminator
        z = torch.randn(n, p.latent_dim, generator=gen).to(dev)
        with torch.no_grad(), ctx.autocast():
            fake = G(z, alpha)
        fake = fake.float()
        if p.loss == "wgan-gp":
            real_in, fake_in = self.d_input(real, ctx), self.d_input(fake, ctx)
            with ctx.autocast():
                d_real = D(real_in, alpha).float()
                d_fake = D(fake_in, alpha).float()
            eps = torch.rand(n, 1, 1, 1, generator=gen).to(dev)
            penalty = regularizers.gradient_penalty(lambda x: D(x, alpha), real_in, fake_in, eps, ctx.autocast)
            d_loss = (losses.d_loss(adv, d_real, d_fake) + p.gp_lambda * penalty
                      + p.drift * regularizers.drift_penalty(d_real))
            metrics["wasserstein"] = float((d_real.mean() - d_fake.mean()).detach())
        else:
            real = real.detach().requires_grad_(True)
            with ctx.autocast():
                d_real = D(self.d_input(real, ctx), alpha).float()
                d_fake = D(self.d_input(fake, ctx), alpha).float()
            penalty = regularizers.r1_penalty(d_real, real)
            d_loss = losses.d_loss(adv, d_real, d_fake) + 0.5 * p.r1_gamma * penalty
        opts["D"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["D"].step()

        # --- generator (D's gradients from this pass are local and discarded)
        z = torch.randn(n, p.latent_dim, generator=gen).to(dev)
        with ctx.no_sync(D):
            with ctx.autocast():
                d_gen = D(self.d_input(G(z, alpha), ctx), alpha).float()
            g_loss = losses.g_loss(adv, d_gen)
            opts["G"].zero_grad(set_to_none=True)
            g_loss.backward()
        opts["G"].step()

        metrics.update(
            loss_d=float(d_loss.detach()), loss_g=float(g_loss.detach()), penalty=float(penalty.detach()),
            d_real=float(d_real.mean().detach()), d_fake=float(d_fake.mean().detach()),
        )
        return metrics

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage: int | None = None) -> torch.Tensor:
        alpha = 1.0 if images_in_stage is None else self.alpha(stage, images_in_stage)
        return ema["G"](z, alpha).float().clamp(-1, 1)
