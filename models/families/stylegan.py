"""StyleGAN (Karras et al. 2019, "A Style-Based Generator Architecture for GANs"), and the style controls that
StyleGAN and StyleGAN2 share: truncation toward w_avg, style mixing, and the figures users draw with them.

StyleGAN v1: an 8-layer mapping network z -> w (pixel-normalized z, learning rate x0.01), a synthesis network
from a learned 4x4 constant with AdaIN at every layer (styles from w through learned affines), per-pixel noise
with learned per-channel strengths, equalized learning rate throughout, grown progressively 4 -> 8 -> ... -> R
with ProGAN's fade-in (one Ray Train job per resolution, each started from the previous one's checkpoint; the
discriminator is ProGAN's). Style mixing regularization (two latents, a random crossover layer, p = 0.9), an EMA
generator whose mapping network carries the tracked w_avg, and the non-saturating logistic loss with R1.

Styles are indexed as in the papers: v1 has two per resolution (4x4: 0 and 1, 8x8: 2 and 3, ...); StyleGAN2
has 2 log2(R) - 2 (each block's toRGB shares the next block's first style). ``coarse`` styles are those of
the 4-8px layers, ``middle`` 16-32px, ``fine`` 64px and up.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ganforge.models import losses, regularizers
from ganforge.models.families.progan import Discriminator, ProGAN, fade_reals
from ganforge.models.family import Betas, Pow2, Section, StageSpec, StepContext
from ganforge.models.nn.equalized import EqualizedConv2d
from ganforge.models.nn.style import FIR, AdaIN, MappingNetwork, NoiseInput, log2, mix_styles

STYLE_BANDS = {"coarse": (4, 8), "middle": (16, 32), "fine": (64, 1 << 30)}


def check_psi(psi: float | None) -> float:
    """Truncation psi as given by a user (pyfunc, CLI, params): in [0, 1], 1 (or None) meaning off."""
    if psi is None:
        return 1.0
    psi = float(psi)
    if not 0.0 <= psi <= 1.0:
        raise ValueError(f"truncation psi must be in [0, 1] (1: off, 0: the w_avg image), got {psi}")
    return psi


class StyleGenerator(nn.Module):
    """What StyleGAN and StyleGAN2 generators share: the mapping network and the styles of a batch (with style
    mixing). Subclasses define ``num_ws`` and ``synthesis(ws, ...)``."""

    num_ws: int
    mapping: MappingNetwork

    def styles(self, z: torch.Tensor, labels: torch.Tensor | None = None, z2: torch.Tensor | None = None,
               cutoff: int | None = None, update_w_avg: bool = False) -> torch.Tensor:
        ws = self.mapping(z, labels, update_w_avg=update_w_avg)[:, None].expand(-1, self.num_ws, -1)
        if z2 is not None and cutoff is not None and cutoff < self.num_ws:  # style mixing regularization
            ws = mix_styles(ws, self.mapping(z2, labels)[:, None].expand(-1, self.num_ws, -1), cutoff)
        return ws

    def forward(self, z: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                ws: torch.Tensor | None = None, z2: torch.Tensor | None = None, cutoff: int | None = None,
                update_w_avg: bool = False, return_ws: bool = False, noise: str = "random",
                generator: torch.Generator | None = None, **synthesis_kw):
        if ws is None:
            ws = self.styles(z, labels, z2, cutoff, update_w_avg)
        img = self.synthesis(ws, noise=noise, generator=generator, **synthesis_kw)
        return (img, ws) if return_ws else img


class StyleControls:
    """Truncation, style mixing and their figures for a family whose ``G`` is a :class:`StyleGenerator`. The
    family defines ``num_ws(stage)``, ``ws_resolution(i, stage)`` and ``synthesize(G, ws, stage, ...)``."""

    supports_truncation = True
    style_family = True

    # --- what each family defines
    def num_ws(self, stage: StageSpec) -> int:
        raise NotImplementedError

    def ws_resolution(self, i: int, stage: StageSpec) -> int:
        """The resolution of the layers style ``i`` drives."""
        raise NotImplementedError

    def synthesize(self, G: StyleGenerator, ws: torch.Tensor, stage: StageSpec,
                   images_in_stage: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def check_cutoff(cls, train, section: StyleParams, styles: int) -> None:
        """Refuse a truncation_cutoff beyond the ``styles`` of a train.resolution model, naming the key."""
        if section.truncation_cutoff is not None and section.truncation_cutoff > styles:
            raise ValueError(f"train.{cls.name}.truncation_cutoff ({section.truncation_cutoff}) is beyond the "
                             f"{styles} styles of a {train.resolution}px {cls.name} model (styles 0-{styles - 1})")

    # --- training: two latents and a crossover layer, p = style_mixing_prob
    def mixing_latents(self, n: int, ctx: StepContext, num_ws: int):
        z = torch.randn(n, self.latent_dim, generator=ctx.generator).to(ctx.device)
        draw = float(torch.rand((), generator=ctx.generator))
        cut = int(torch.randint(1, max(2, num_ws), (), generator=ctx.generator))
        if self.p.style_mixing_prob > 0 and num_ws > 1 and draw < self.p.style_mixing_prob:
            return z, torch.randn(n, self.latent_dim, generator=ctx.generator).to(ctx.device), cut
        return z, None, None

    # --- sampling: seed -> z -> w -> (truncated) styles -> image, with each layer's fixed noise
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        psi = check_psi(truncation)
        G = ema["G"]
        with torch.no_grad():
            ws = G.styles(z, labels)
            ws = G.mapping.truncate(ws, psi, self.p.truncation_cutoff)
            return self.synthesize(G, ws, stage, images_in_stage).float().clamp(-1, 1)

    @torch.no_grad()
    def seed_styles(self, ema, stage: StageSpec, seeds: Sequence[int], psi: float | None = None,
                    labels: Sequence[int] | None = None) -> torch.Tensor:
        """Styles [N, num_ws, w_dim] of seeds (as the pyfunc draws them), truncated by psi."""
        G = ema["G"]
        dev = next(G.parameters()).device
        z = torch.stack([self.latent(s) for s in seeds]).to(dev)
        lab = None
        if self.num_classes:
            lab = torch.tensor([int(v) for v in (labels if labels is not None else map(self.label_for, seeds))],
                               device=dev)
        return G.mapping.truncate(G.styles(z, lab), check_psi(psi), self.p.truncation_cutoff)

    def layer_names(self, stage: StageSpec) -> str:
        n = self.num_ws(stage)
        bands = [f"{b} {r.start}-{r.stop - 1}" for b in STYLE_BANDS if (r := self._band(b, stage))]
        return f"styles 0-{n - 1} ({', '.join(bands)})"

    def _band(self, band: str, stage: StageSpec) -> range | None:
        lo, hi = STYLE_BANDS[band]
        idx = [i for i in range(self.num_ws(stage)) if lo <= self.ws_resolution(i, stage) <= hi]
        return range(idx[0], idx[-1] + 1) if idx else None

    def layer_range(self, spec: str, stage: StageSpec) -> range:
        """``coarse`` | ``middle`` | ``fine`` | ``A-B`` (style indices, inclusive) -> the styles a mix swaps."""
        n, r = self.num_ws(stage), stage.resolution
        spec = str(spec).strip()
        if spec in STYLE_BANDS:
            rng = self._band(spec, stage)
            if rng is None:
                lo, hi = STYLE_BANDS[spec]
                raise ValueError(f"this {r}px model has no {spec} layers ({lo}px and up); it has "
                                 f"{self.layer_names(stage)}")
            return rng
        m = re.fullmatch(r"(\d+)-(\d+)|(\d+)", spec)
        if not m:
            raise ValueError(f"layers must be coarse, middle, fine or A-B (style indices), got {spec!r}")
        a, b = (int(m[1]), int(m[2])) if m[1] is not None else (int(m[3]), int(m[3]))
        if not 0 <= a <= b < n:
            raise ValueError(f"layers {spec} are out of range: this {r}px model has {self.layer_names(stage)}")
        return range(a, b + 1)

    @torch.no_grad()
    def style_mix(self, ema, stage: StageSpec, rows: Sequence[int], cols: Sequence[int], layers: str,
                  psi: float | None = None) -> tuple[torch.Tensor, int]:
        """The style-mixing figure: a blank corner, the column sources along the top, the row sources down the
        left, and at (i, j) row i's image with the styles ``layers`` taken from column j. (images, per row)."""
        swap = list(self.layer_range(layers, stage))
        G = ema["G"]
        rw, cw = self.seed_styles(ema, stage, rows, psi), self.seed_styles(ema, stage, cols, psi)
        row_img = self.synthesize(G, rw, stage).float().clamp(-1, 1)
        col_img = self.synthesize(G, cw, stage).float().clamp(-1, 1)
        blank = torch.ones_like(row_img[0])
        out = [blank, *col_img]
        for i in range(len(rows)):
            mixed = rw[i:i + 1].repeat(len(cols), 1, 1)
            mixed[:, swap] = cw[:, swap]
            out += [row_img[i], *self.synthesize(G, mixed, stage).float().clamp(-1, 1)]
        return torch.stack(out), len(cols) + 1

    @torch.no_grad()
    def truncation_sweep(self, ema, stage: StageSpec, seeds: Sequence[int],
                         psis: Sequence[float] = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)) -> tuple[torch.Tensor, int]:
        """One row per seed, psi from 1 (left) to 0 (right: the w_avg image in every row)."""
        G = ema["G"]
        ws = self.seed_styles(ema, stage, seeds)
        cols = [self.synthesize(G, G.mapping.truncate(ws, check_psi(p), self.p.truncation_cutoff), stage)
                for p in psis]
        return torch.stack(cols, 1).flatten(0, 1).float().clamp(-1, 1), len(psis)

    @torch.no_grad()
    def interpolation(self, ema, stage: StageSpec, seeds: Sequence[int], steps: int = 8) -> tuple[torch.Tensor, int]:
        """Rows of ``steps`` images along straight lines in W between consecutive seeds."""
        G = ema["G"]
        ws = self.seed_styles(ema, stage, seeds)
        t = torch.linspace(0, 1, steps, device=ws.device)[:, None, None]
        rows = [self.synthesize(G, torch.lerp(ws[i:i + 1], ws[i + 1:i + 2], t), stage)
                for i in range(len(seeds) - 1)]
        return torch.cat(rows).float().clamp(-1, 1), steps

    def grid(self, ema, stage, seeds, real_fn, images_in_stage=None):
        """The checkpoint grid at ``grid_truncation``; one row per class when class-conditional."""
        labels = None
        if self.num_classes:
            n = self.params.grid_size
            labels = [(i // n) % self.num_classes for i in range(len(seeds))]
        return self.sample(ema, stage, seeds, labels=labels, truncation=self.p.grid_truncation,
                           images_in_stage=images_in_stage)

    def figures(self, ema, stage: StageSpec, seeds: Sequence[int]) -> dict[str, tuple[torch.Tensor, int]]:
        if not self.can_sample(stage):
            return {}
        seeds = list(seeds) + [max(seeds, default=0) + 1 + i for i in range(max(0, 11 - len(seeds)))]
        out = {}
        for band in STYLE_BANDS:
            if self._band(band, stage):
                out[f"stylemix-{band}"] = self.style_mix(ema, stage, seeds[:4], seeds[4:9], band)
        out["truncation"] = self.truncation_sweep(ema, stage, seeds[:6])
        out["interpolation"] = self.interpolation(ema, stage, seeds[:4])
        return out


# ----------------------------------------------------------------------------- StyleGAN v1


class StyleParams(Section):
    """What StyleGAN and StyleGAN2 sections share: the mapping network, style mixing, w_avg and truncation."""

    latent_dim: int = Field(128, ge=1, description="z dimensions (512 in the papers)")
    w_dim: int = Field(128, ge=1, description="w dimensions (512 in the papers)")
    mapping_layers: int = Field(8, ge=1, description="FC layers of the mapping network (NVlabs' small configs: 2)")
    mapping_lr_mul: float = Field(0.01, gt=0, description="learning-rate multiplier of the mapping network")
    style_mixing_prob: float = Field(0.9, ge=0, le=1, description="probability of a two-latent batch")
    w_avg_beta: float = Field(0.995, ge=0, lt=1, description="decay of the tracked mean w")
    truncation_cutoff: int | None = Field(None, ge=1, description="truncation moves styles 0..cutoff-1 (null: all)")
    grid_truncation: float = Field(1.0, ge=0, le=1, description="psi of the checkpoint grids (1: none)")
    minibatch_std_group: int = Field(4, ge=1)


class StyleGANParams(StyleParams):
    """StyleGAN (v1): mapping network + AdaIN synthesis + noise, progressive stages with fade-in, style mixing."""

    start_resolution: Pow2 = Field(4, ge=4, description="first stage's resolution (power of two)")
    fmap_base: int = Field(2048, ge=8, description="channels at 4x4 before the cap; halves per doubling")
    fmap_max: int = Field(128, ge=4, description="channel cap (512 in the paper; small for laptops)")
    fmap_min: int = Field(16, ge=1)
    transition_kimg: float = Field(4.0, ge=0, description="thousands of images over which alpha rises 0->1")
    stabilize_kimg: float = Field(4.0, gt=0, description="thousands of images at alpha=1 after the transition")
    lr: float = Field(1e-3, gt=0)
    betas: Betas = (0.0, 0.99)
    r1_gamma: float = Field(10.0, ge=0, description="R1 weight (the loss is the non-saturating logistic one)")


class _V1Layer(nn.Module):
    """(FIR upsample) -> 3x3 conv -> per-channel noise -> bias, leaky ReLU -> AdaIN(style); the 4x4 input layer
    has no convolution (it starts from the constant)."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, conv: bool = True, up: bool = False):
        super().__init__()
        self.conv = EqualizedConv2d(cin, cout, 3, 1, bias=False) if conv else None
        self.fir = FIR() if up else None
        self.noise = NoiseInput(resolution, cout)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.adain = AdaIN(w_dim, cout)

    def forward(self, x, w, noise="random", generator=None):
        if self.conv is not None:
            if self.fir is not None:
                x = self.fir.up(x)
            x = self.conv(x)
        x = self.noise(x, noise, generator)
        return self.adain(F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2), w)


class StyleGANGenerator(StyleGenerator):
    """Resolutions 4..R, two styled layers each, toRGB of R and R/2 for the fade-in (as ProGAN's)."""

    def __init__(self, resolution: int, z_dim: int, w_dim: int, mapping_layers: int, lr_mul: float, nf,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.resolution = resolution
        self.res = [2 ** i for i in range(2, log2(resolution) + 1)]
        self.num_ws = 2 * len(self.res)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, lr_mul, w_avg_beta=w_avg_beta)
        self.const = nn.Parameter(torch.ones(1, nf(4), 4, 4))
        self.blocks = nn.ModuleDict()
        for r in self.res:
            cin = nf(4) if r == 4 else nf(r // 2)
            self.blocks[str(r)] = nn.ModuleList([_V1Layer(cin, nf(r), w_dim, r, conv=r > 4, up=r > 4),
                                                 _V1Layer(nf(r), nf(r), w_dim, r)])
        self.to_rgb = nn.ModuleDict({str(r): EqualizedConv2d(nf(r), 3, 1, gain=1.0) for r in self.res[-2:]})

    def synthesis(self, ws, noise="random", generator=None, alpha: float = 1.0):
        x = self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        prev = x
        for i, r in enumerate(self.res):
            prev = x
            a, b = self.blocks[str(r)]
            x = b(a(x, ws[:, 2 * i], noise, generator), ws[:, 2 * i + 1], noise, generator)
        y = self.to_rgb[str(self.resolution)](x)
        if len(self.res) > 1:
            y_old = F.interpolate(self.to_rgb[str(self.resolution // 2)](prev), scale_factor=2, mode="nearest")
            y = torch.lerp(y_old, y, alpha)
        return y


class StyleGAN(StyleControls, ProGAN):
    name = "stylegan"
    contract_overrides = {"fmap_base": 32, "fmap_max": 8, "fmap_min": 4, "latent_dim": 8, "w_dim": 8,
                          "mapping_layers": 2}
    Params = StyleGANParams
    stage_prefix = "stylegan"

    @classmethod
    def check_params(cls, train, section: StyleGANParams) -> None:
        super().check_params(train, section)
        cls.check_cutoff(train, section, 2 * (log2(train.resolution) - 1))

    def num_ws(self, stage: StageSpec) -> int:
        return 2 * (log2(stage.resolution) - 1)

    def ws_resolution(self, i: int, stage: StageSpec) -> int:
        return 2 ** (2 + i // 2)

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        p = self.p
        return {"G": StyleGANGenerator(stage.resolution, p.latent_dim, p.w_dim, p.mapping_layers, p.mapping_lr_mul,
                                       self.nf, p.w_avg_beta),
                "D": Discriminator(stage.resolution, self.nf, p.minibatch_std_group)}

    def synthesize(self, G, ws, stage, images_in_stage=None):
        alpha = 1.0 if images_in_stage is None else self.alpha(stage, images_in_stage)
        return G(ws=ws, noise="const", alpha=alpha)

    def discriminate(self, modules, stage, real, fake, labels=None):
        """D on real and fake images in two passes, as NVlabs' run_D does (its minibatch-std groups see one pass)."""
        return modules["D"](real, 1.0), modules["D"](fake, 1.0)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        G, D = modules["G"], modules["D"]
        p, gen = self.p, ctx.generator
        alpha = self.alpha(stage, ctx.images_in_stage)
        real = fade_reals(batch["image"], alpha)
        n, num_ws = real.shape[0], self.num_ws(stage)

        # --- discriminator: logistic loss + R1 on the reals
        z, z2, cut = self.mixing_latents(n, ctx, num_ws)
        with torch.no_grad(), ctx.autocast():
            fake = G(z, z2=z2, cutoff=cut, alpha=alpha, generator=gen).float()
        real = real.detach().requires_grad_(True)
        with ctx.autocast():
            d_real = D(self.d_input(real, ctx), alpha).float()
            d_fake = D(self.d_input(fake, ctx), alpha).float()
        r1 = regularizers.r1_penalty(d_real, real)
        d_loss = losses.d_loss("non-saturating", d_real, d_fake) + 0.5 * p.r1_gamma * r1
        opts["D"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["D"].step()

        # --- generator (tracks w_avg)
        z, z2, cut = self.mixing_latents(n, ctx, num_ws)
        with ctx.no_sync(D):
            with ctx.autocast():
                img = G(z, z2=z2, cutoff=cut, alpha=alpha, generator=gen, update_w_avg=True)
                d_gen = D(self.d_input(img.float(), ctx), alpha).float()
            g_loss = losses.g_loss("non-saturating", d_gen)
            opts["G"].zero_grad(set_to_none=True)
            g_loss.backward()
        opts["G"].step()
        return {"alpha": alpha, "loss_d": float(d_loss.detach()), "loss_g": float(g_loss.detach()),
                "r1_penalty": float(r1.detach()), "d_real": float(d_real.mean().detach()),
                "d_fake": float(d_fake.mean().detach()), "mixed": float(cut is not None and z2 is not None)}
