"""SAGAN (Zhang et al. 2018) and BigGAN (Brock et al. 2018): class-conditional ResNet GANs with self-attention,
spectral normalisation in G and D, the hinge loss and a projection discriminator.

- ``sagan``: conditional BatchNorm in G with per-class gains and biases; TTUR (D lr 4e-4, G lr 1e-4, Adam
  (0, 0.9)); one D step per G step.
- ``biggan``: a shared class embedding; the latent z is split into one chunk per G block (plus one for the
  input), and each block's conditional BatchNorms read [shared embedding, its chunk] through linear layers
  (hierarchical latents); orthogonal regularisation (beta = 1e-4, off-diagonal) on G; ``d_steps`` D updates per
  G update on fresh batches; an EMA generator that starts at ``ema_start_kimg``; optional standing statistics;
  the truncation trick (latents from a truncated normal, values beyond the threshold resampled, not scaled).

Channels at feature size r are ``ch * min(8, R / r)`` (R = train.resolution): ``ch`` = 32 trains at 32px on a
CPU, 64-96 is the papers' width at 32-128px on a GPU. Self-attention sits at ``attention`` px in G and D.
"""

from __future__ import annotations

import copy
import math
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ganforge.models import losses, regularizers
from ganforge.models.family import Betas, Section, SingleStageFamily, StageSpec, StepContext
from ganforge.models.nn.biggan import (DBlock, GBlock, ProjectionHead, SelfAttention, sn_conv, sn_linear,
                                       truncated_normal)


class _ResNetGANParams(Section):
    ch: int = Field(32, ge=4, description="base width: channels at size r are ch * min(8, R/r)")
    latent_dim: int = Field(128, ge=4)
    attention: int = Field(16, ge=0, description="resolution of the self-attention block in G and D (0: none)")
    conditional: bool = Field(True, description="class-conditional (labels from the shards); false: unconditional")
    num_classes: int = Field(10, ge=2, description="classes of a conditional model (must match the shards)")
    kimg: float = Field(20.0, gt=0, description="thousands of real images shown to D (every D step counts)")
    lr_g: float = Field(1e-4, gt=0)
    lr_d: float = Field(4e-4, gt=0)
    betas: Betas = (0.0, 0.9)
    d_steps: int = Field(1, ge=1, description="D updates per G update, each on a fresh real batch")


class SAGANParams(_ResNetGANParams):
    """SAGAN: self-attention, spectral norm in G and D, hinge loss, TTUR, conditional BN + projection D."""


class BigGANParams(_ResNetGANParams):
    """BigGAN: hierarchical latents + shared embedding, orthogonal regularisation, D steps, EMA, truncation."""

    shared_dim: int = Field(128, ge=1, description="size of the shared class embedding")
    d_steps: int = Field(2, ge=1, description="D updates per G update, each on a fresh real batch")
    ortho_beta: float = Field(1e-4, ge=0, description="orthogonal regularisation weight on G (0: off)")
    ema_start_kimg: float = Field(1.0, ge=0, description="the EMA generator copies G until this many kimg")
    standing_stats: int = Field(0, ge=0, description="batches of standing BatchNorm statistics at sampling (0: off)")
    grid_truncation: float | None = Field(None, gt=0, description="truncation threshold of the checkpoint grids "
                                                                   "(null: none; the pyfunc takes its own)")


def channels(resolution: int, ch: int):
    return lambda r: ch * min(8, resolution // r)


def _sizes(resolution: int) -> list[int]:
    return [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]


class Generator(nn.Module):
    """4x4 from z, residual up blocks to R, self-attention at ``attention``; conditioning per block."""

    def __init__(self, resolution: int, ch: int, latent_dim: int, num_classes: int, attention: int,
                 hierarchical: bool, shared_dim: int = 0):
        super().__init__()
        c = channels(resolution, ch)
        sizes = _sizes(resolution)
        self.n_blocks = len(sizes) - 1
        self.hierarchical = hierarchical and num_classes > 0
        self.latent_dim = latent_dim
        if self.hierarchical:
            self.chunk = latent_dim // (self.n_blocks + 1)
            self.shared = nn.Embedding(num_classes, shared_dim)
            cond_dim, per_class = shared_dim + self.chunk, 0
            z_in = latent_dim - self.chunk * self.n_blocks
        else:
            self.chunk, self.shared = 0, None
            cond_dim, per_class = 0, num_classes
            z_in = latent_dim
        self.c4 = c(4)
        self.linear = sn_linear(z_in, c(4) * 16)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        for r in sizes[1:]:
            self.blocks.append(GBlock(c(r // 2), c(r), cond_dim, per_class))
            if r == attention:
                self.attn[str(r)] = SelfAttention(c(r))
        self.sizes = sizes[1:]
        self.out_bn = nn.BatchNorm2d(c(resolution), eps=1e-4)
        self.out = sn_conv(c(resolution), 3)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)) and not isinstance(m, nn.Embedding):
                nn.init.orthogonal_(m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.hierarchical:
            if labels is None:
                raise ValueError("a conditional generator needs labels")
            zs = torch.split(z, [z.shape[1] - self.chunk * self.n_blocks] + [self.chunk] * self.n_blocks, dim=1)
            y = self.shared(labels)
            conds = [torch.cat([y, zi], 1) for zi in zs[1:]]
            z = zs[0]
        else:
            conds = [labels] * self.n_blocks
        h = self.linear(z).view(-1, self.c4, 4, 4)
        for r, block, cond in zip(self.sizes, self.blocks, conds):
            h = block(h, cond)
            if str(r) in self.attn:
                h = self.attn[str(r)](h)
        return torch.tanh(self.out(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    """Residual down blocks R -> 4 (+ one at 4), self-attention at ``attention``, sum pooling, projection."""

    def __init__(self, resolution: int, ch: int, num_classes: int, attention: int, in_channels: int = 3):
        super().__init__()
        c = channels(resolution, ch)
        sizes = list(reversed(_sizes(resolution)))  # R, R/2, ..., 4
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin = in_channels
        for i, r in enumerate(sizes[:-1]):
            self.blocks.append(DBlock(cin, c(r), down=True, first=i == 0))
            cin = c(r)
            if r == attention:
                self.attn[str(len(self.blocks) - 1)] = SelfAttention(cin)
        self.final = DBlock(cin, c(4), down=False)
        self.head = ProjectionHead(c(4), num_classes)
        for m in self.modules():
            if hasattr(m, "parametrizations") and not isinstance(m, nn.Embedding):
                nn.init.orthogonal_(m.parametrizations.weight.original)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(self.final(h)).sum(dim=(2, 3))
        return self.head(h, labels)


class SAGAN(SingleStageFamily):
    name = "sagan"
    contract_overrides = {"ch": 4, "latent_dim": 8, "attention": 8}
    Params = SAGANParams
    adaptive_augment = True
    hierarchical = False

    def __init__(self, params):
        super().__init__(params)
        self.latent_dim = self.p.latent_dim
        self.num_classes = self.p.num_classes if self.p.conditional else 0

    @classmethod
    def check_params(cls, train, section) -> None:
        if train.resolution < 8:
            raise ValueError(f"train.{cls.name} needs train.resolution >= 8, got {train.resolution}")
        if section.attention and (section.attention not in _sizes(train.resolution)[1:]):
            raise ValueError(f"train.{cls.name}.attention must be 0 or one of {_sizes(train.resolution)[1:]}, got "
                             f"{section.attention}")

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        p, r = self.p, stage.resolution
        return {"G": Generator(r, p.ch, p.latent_dim, self.num_classes, p.attention, self.hierarchical,
                               getattr(p, "shared_dim", 0)),
                "D": Discriminator(r, p.ch, self.num_classes, p.attention, self.d_in_channels)}

    def optimizers(self, modules):
        p = self.p
        return {"G": torch.optim.Adam(modules["G"].parameters(), lr=p.lr_g, betas=p.betas, eps=1e-6),
                "D": torch.optim.Adam(modules["D"].parameters(), lr=p.lr_d, betas=p.betas, eps=1e-6)}

    def plot_key(self, stage: StageSpec) -> str:
        return "loss_d"

    def g_regularizer(self, G: nn.Module) -> torch.Tensor | None:
        return None

    def discriminate(self, modules, stage, real, fake, labels=None):
        """D on real and fake images in two passes (a spectrally normalized D without batch statistics)."""
        return modules["D"](real, labels), modules["D"](fake, labels)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        G, D = modules["G"], modules["D"]
        p, dev, gen = self.p, ctx.device, ctx.generator

        def aug(x):  # train.augment: the same policy on real and fake images, fresh randomness from the step
            return self.d_input(x, ctx)

        for i in range(p.d_steps):
            b = batch if i == 0 else ctx.next_batch()
            real, y = b["image"], self.batch_labels(b)
            z = torch.randn(real.shape[0], p.latent_dim, generator=gen).to(dev)
            with torch.no_grad(), ctx.autocast():
                fake = G(z, y).float()
            with ctx.autocast():
                d_real = D(aug(real), y).float()
                d_fake = D(aug(fake), y).float()
            d_loss = losses.d_loss("hinge", d_real, d_fake)
            self.d_feedback(d_real)  # ADA / Diffusion-GAN
            opts["D"].zero_grad(set_to_none=True)
            d_loss.backward()
            opts["D"].step()

        y = self.batch_labels(batch)
        z = torch.randn(batch["image"].shape[0], p.latent_dim, generator=gen).to(dev)
        with ctx.no_sync(D):
            with ctx.autocast():
                g_loss = losses.g_loss("hinge", D(aug(G(z, y)), y).float())
            reg = self.g_regularizer(G)
            total = g_loss + reg if reg is not None else g_loss
            opts["G"].zero_grad(set_to_none=True)
            total.backward()
        opts["G"].step()
        out = {"loss_d": float(d_loss.detach()), "loss_g": float(g_loss.detach()),
               "d_real": float(d_real.mean().detach()), "d_fake": float(d_fake.mean().detach())}
        if reg is not None:
            out["ortho"] = float(reg.detach())
        return out

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        return ema["G"](z, labels).float().clamp(-1, 1)


class BigGAN(SAGAN):
    name = "biggan"
    contract_overrides = {"ch": 4, "latent_dim": 8, "attention": 8,
                          "shared_dim": 8, "ema_start_kimg": 0.0}
    Params = BigGANParams
    hierarchical = True
    supports_truncation = True

    def g_regularizer(self, G: nn.Module) -> torch.Tensor | None:
        if not self.p.ortho_beta:
            return None
        # BigGAN's off-diagonal orthogonal regularisation on G's weights; the shared class embedding is left out
        # (as in BigGAN-PyTorch)
        return regularizers.orthogonal_penalty(G, self.p.ortho_beta, skip=lambda name, prm: name.startswith("shared"))

    def ema_start(self, stage: StageSpec) -> int:
        return int(self.p.ema_start_kimg * 1000)

    def latent_for(self, seed: int, truncation: float | None = None) -> torch.Tensor:
        """The truncation trick: z from a truncated normal (values beyond +-truncation resampled, not scaled)."""
        if truncation is None or truncation <= 0 or truncation >= 10:
            return self.latent(seed)
        return truncated_normal((self.latent_dim,), truncation, torch.Generator().manual_seed(int(seed)))

    def grid(self, ema, stage, seeds, real_fn, images_in_stage=None) -> torch.Tensor:
        n = self.params.grid_size
        labels = [(i // n) % self.num_classes for i in range(len(seeds))] if self.num_classes else None
        return self.sample(ema, stage, seeds, labels=labels, truncation=self.p.grid_truncation,
                           images_in_stage=images_in_stage)

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        G = self._with_standing_stats(ema["G"]) if self.p.standing_stats else ema["G"]
        return G(z, labels).float().clamp(-1, 1)

    def _with_standing_stats(self, G: nn.Module) -> nn.Module:
        """A copy of G whose BatchNorm statistics are the average over ``standing_stats`` batches of its own samples
        (BigGAN sec. 4 / BigGAN-PyTorch's standing stats); cached until G's weights change; deterministic."""
        key = float(sum(float(t.double().sum()) for t in list(G.parameters()) + list(G.buffers())))
        cached = getattr(self, "_standing", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        g = copy.deepcopy(G).eval()
        bns = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()  # only the norms: spectral norm's power iteration stays frozen
        dev = next(G.parameters()).device
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.p.standing_stats):
            z = torch.randn(64, self.latent_dim, generator=gen).to(dev)
            y = torch.randint(0, self.num_classes, (64,), generator=gen).to(dev) if self.num_classes else None
            g(z, y)
        g.eval()
        self._standing = (key, g)
        return g


__all__ = ["SAGAN", "BigGAN", "SAGANParams", "BigGANParams", "Generator", "Discriminator"]
