"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN").

- Generator: the mapping network of StyleGAN (optionally class-conditional: an embedded label joins z), a learned
  4x4 constant, modulated 3x3 convolutions with weight demodulation (no AdaIN), noise and bias applied outside
  the style block, and skip connections: each resolution's toRGB output is added to the upsampled image.
- Discriminator: residual, with minibatch standard deviation; a projection head when class-conditional (the
  label through one embedding layer, where NVlabs uses a small mapping network). Its second convolution runs
  after the FIR downsample, at half resolution (NVlabs: blur, then a stride-2 convolution).
- Up/down-sampling with the FIR filter [1, 3, 3, 1] in plain PyTorch (``models/nn/style.py``).
- Loss: non-saturating logistic; lazy R1 every ``r1_interval`` minibatches and lazy path-length regularization
  every ``pl_interval``, each scaled by its interval, with Adam's lr and betas adjusted as in the paper
  (c = interval / (interval + 1)); the path-length running mean is family state, in every checkpoint.
- Style mixing regularization, an EMA generator with ramp-up (half-life min(ema_half_life, rampup x images)),
  w_avg tracking and truncation psi with a cutoff style.
- One stage at ``train.resolution``. Fine-tuning at another resolution or on other data starts from a
  checkpoint through the same chaining (``ganforge train --init CKPT``): every tensor whose name and shape
  match is taken over, the rest (a new resolution's block and toRGB/fromRGB) keeps its init.

Channels at resolution r are min(channel_base / r, channel_max): channel_base 2048 / channel_max 128 trains at
32px on a CPU; 16384-32768 / 512 is the paper's width.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from torch import nn

from ganforge.models import losses, regularizers
from ganforge.models.families.stylegan import StyleControls, StyleGenerator, StyleParams
from ganforge.models.family import Betas, SingleStageFamily, StageSpec, StepContext
from ganforge.models.nn.equalized import EqualizedConv2d, EqualizedLinear, MinibatchStd
from ganforge.models.nn.style import FIR, MappingNetwork, NoiseInput, act, log2, modulated_conv2d

log = logging.getLogger("ganforge.family")


class StyleGAN2Params(StyleParams):
    """StyleGAN2: modulated convolutions, skip G, residual D, lazy R1 + path-length regularization, EMA ramp-up."""

    channel_base: int = Field(2048, ge=4, description="channels at resolution r: min(channel_base / r, channel_max)")
    channel_max: int = Field(128, ge=1, description="channel cap (512 in the paper)")
    conditional: bool = Field(False, description="class-conditional: the label is embedded into the mapping network "
                                                 "and projected in D (labels from the shards)")
    num_classes: int = Field(10, ge=2, description="classes of a conditional model (must match the shards)")
    kimg: float = Field(20.0, gt=0, description="thousands of real images shown")
    lr: float = Field(0.0025, gt=0)
    betas: Betas = (0.0, 0.99)
    r1_gamma: float | None = Field(None, ge=0, description="R1 weight; null: NVlabs' heuristic 0.0002 R^2 / batch")
    r1_interval: int = Field(16, ge=1, description="lazy R1: every this many minibatches (1: every step)")
    pl_weight: float = Field(2.0, ge=0, description="path-length regularization weight (0: off)")
    pl_interval: int = Field(4, ge=1, description="lazy path-length regularization: every this many minibatches")
    pl_decay: float = Field(0.01, gt=0, le=1, description="decay of the path-length running mean")
    pl_batch_shrink: int = Field(2, ge=1, description="the path-length batch is the batch / this")
    ema_rampup: float | None = Field(0.05, gt=0, description="EMA half-life <= this x images seen (null: none)")


def channels(channel_base: int, channel_max: int):
    return lambda r: min(channel_base // r, channel_max)


# ----------------------------------------------------------------------------- generator


class SynthesisLayer(nn.Module):
    """(FIR upsample) -> modulated, demodulated 3x3 conv -> noise -> bias, leaky ReLU (outside the style block)."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, cin, gain=1.0, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise = NoiseInput(resolution, 1)
        self.fir = FIR() if up else None

    def forward(self, x, w, noise="random", generator=None):
        if self.fir is not None:
            x = self.fir.up(x)
        x = modulated_conv2d(x, self.weight, self.affine(w), demodulate=True, padding=1)
        x = self.noise(x, noise, generator)
        return act(x + self.bias.to(x.dtype).view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, plus bias."""

    def __init__(self, cin: int, w_dim: int):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, cin, gain=1.0, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.gain = 1.0 / math.sqrt(cin)

    def forward(self, x, w):
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.gain, demodulate=False)
        return x + self.bias.to(x.dtype).view(1, -1, 1, 1)


class Generator(StyleGenerator):
    def __init__(self, resolution: int, z_dim: int, w_dim: int, mapping_layers: int, lr_mul: float, nf,
                 num_classes: int = 0, w_avg_beta: float = 0.995):
        super().__init__()
        self.resolution = resolution
        self.res = [2 ** i for i in range(2, log2(resolution) + 1)]
        self.num_ws = 2 * log2(resolution) - 2  # 4x4: conv + toRGB; each doubling: 2 convs (toRGB shares the next)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, lr_mul, num_classes, w_avg_beta)
        self.const = nn.Parameter(torch.randn(1, nf(4), 4, 4))
        self.conv0 = nn.ModuleDict({str(r): SynthesisLayer(nf(r // 2), nf(r), w_dim, r, up=True) for r in self.res[1:]})
        self.conv1 = nn.ModuleDict({str(r): SynthesisLayer(nf(r), nf(r), w_dim, r) for r in self.res})
        self.to_rgb = nn.ModuleDict({str(r): ToRGB(nf(r), w_dim) for r in self.res})
        self.fir = FIR()

    def synthesis(self, ws, noise="random", generator=None):
        x = self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        x = self.conv1["4"](x, ws[:, 0], noise, generator)
        img = self.to_rgb["4"](x, ws[:, 1])
        i = 1
        for r in self.res[1:]:
            k = str(r)
            x = self.conv0[k](x, ws[:, i], noise, generator)
            x = self.conv1[k](x, ws[:, i + 1], noise, generator)
            img = self.fir.up(img) + self.to_rgb[k](x, ws[:, i + 2])
            i += 2
        return img


# ----------------------------------------------------------------------------- discriminator


class DBlock(nn.Module):
    """Residual: two 3x3 convs (the second after a FIR downsample) beside a 1x1 downsampled skip, summed x sqrt(1/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(cin, cin, 3, 1, gain=1.0)
        self.conv1 = EqualizedConv2d(cin, cout, 3, 1, gain=1.0)
        self.skip = EqualizedConv2d(cin, cout, 1, 0, gain=1.0, bias=False)
        self.fir = FIR()

    def forward(self, x):
        y = self.skip(self.fir.down(x))
        x = act(self.conv1(self.fir.down(act(self.conv0(x)))))
        return (x + y) * math.sqrt(0.5)


class Discriminator(nn.Module):
    def __init__(self, resolution: int, nf, num_classes: int = 0, mbstd_group: int = 4, in_channels: int = 3):
        super().__init__()
        self.resolution = resolution
        res = [2 ** i for i in range(2, log2(resolution) + 1)]
        c4 = nf(4)
        self.from_rgb = nn.ModuleDict({str(resolution): EqualizedConv2d(in_channels, nf(resolution), 1, gain=1.0)})
        self.blocks = nn.ModuleDict({str(r): DBlock(nf(r), nf(r // 2)) for r in reversed(res[1:])})
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv = EqualizedConv2d(c4 + 1, c4, 3, 1, gain=1.0)
        self.fc = EqualizedLinear(c4 * 16, c4, gain=1.0)
        self.cmap_dim = c4 if num_classes else 1
        self.out = EqualizedLinear(c4, self.cmap_dim, gain=1.0)
        self.embed = EqualizedLinear(num_classes, c4, gain=1.0) if num_classes else None
        self.num_classes = num_classes

    def forward(self, img, labels=None):
        x = act(self.from_rgb[str(self.resolution)](img))
        for block in self.blocks.values():
            x = block(x)
        x = act(self.conv(self.mbstd(x)))
        x = self.out(act(self.fc(x.flatten(1))))
        if self.embed is not None:  # projection: <features, embedded label> / sqrt(dim)
            if labels is None:
                raise ValueError("a class-conditional discriminator needs labels")
            cmap = self.embed(torch.nn.functional.one_hot(labels, self.num_classes).to(x.dtype))
            x = (x * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return x


# ----------------------------------------------------------------------------- the family


class StyleGAN2(StyleControls, SingleStageFamily):
    name = "stylegan2"
    # lazy R1 and path-length phases both fall inside the contract's steps (and its resume)
    contract_overrides = {"channel_base": 32, "channel_max": 8, "latent_dim": 8, "w_dim": 8, "mapping_layers": 2,
                          "r1_interval": 2, "pl_interval": 3}
    contract_variants = {"conditional": {"conditional": True}}
    Params = StyleGAN2Params
    adaptive_augment = True

    def __init__(self, params):
        super().__init__(params)
        self.latent_dim = self.p.latent_dim
        self.num_classes = self.p.num_classes if self.p.conditional else 0
        self.nf = channels(self.p.channel_base, self.p.channel_max)
        self.pl_mean = torch.zeros(())

    @classmethod
    def check_params(cls, train, section: StyleGAN2Params) -> None:
        R = train.resolution
        if section.channel_base // R < 1:
            raise ValueError(f"train.{cls.name}.channel_base ({section.channel_base}) gives no channels at "
                             f"train.resolution {R}px (channels = channel_base / resolution): set it to at least {R}")
        cls.check_cutoff(train, section, 2 * log2(R) - 2)

    def r1_gamma(self) -> float:
        g = self.p.r1_gamma
        return 0.0002 * self.params.resolution ** 2 / self.params.batch_size if g is None else g

    def notes(self, stage: StageSpec) -> dict[str, str]:
        if self.p.r1_gamma is None:
            return {"r1_gamma": f"{self.r1_gamma():.4g} (NVlabs' 0.0002 R^2 / batch; set train.stylegan2.r1_gamma "
                                f"to choose)"}
        return {}

    def num_ws(self, stage: StageSpec) -> int:
        return 2 * log2(stage.resolution) - 2

    def ws_resolution(self, i: int, stage: StageSpec) -> int:
        return min(stage.resolution, 2 ** (2 + (i + 1) // 2))

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        p = self.p
        return {"G": Generator(stage.resolution, p.latent_dim, p.w_dim, p.mapping_layers, p.mapping_lr_mul,
                               self.nf, self.num_classes, p.w_avg_beta),
                "D": Discriminator(stage.resolution, self.nf, self.num_classes, p.minibatch_std_group,
                                   self.d_in_channels)}

    def grow(self, modules, previous) -> None:
        """From another StyleGAN2 checkpoint (fine-tuning; ``ganforge train --init``): every tensor whose name and
        shape match; what this resolution adds keeps its init."""
        kept = skipped = 0
        for name, sd in previous.items():
            if name not in modules:
                continue
            own = modules[name].state_dict()
            take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
            kept += len(take)
            skipped += len(sd) - len(take)
            modules[name].load_state_dict(take, strict=False)
        if skipped:
            log.info("stylegan2: started from a checkpoint of another shape: %d tensors taken over, %d left out",
                     kept, skipped)

    def optimizers(self, modules):
        """Adam per network; with a lazy regularizer every k minibatches, lr x c and betas ^ c, c = k / (k + 1)."""
        p = self.p
        out = {}
        for name, k in (("G", p.pl_interval if p.pl_weight > 0 else None),
                        ("D", p.r1_interval if self.r1_gamma() > 0 else None)):
            c = k / (k + 1) if k else 1.0
            out[name] = torch.optim.Adam(modules[name].parameters(), lr=p.lr * c,
                                         betas=(p.betas[0] ** c, p.betas[1] ** c), eps=1e-8)
        return out

    def ema_half_life(self, stage: StageSpec, images_in_stage: int, half_life_images: float) -> float:
        r = self.p.ema_rampup
        return half_life_images if r is None else min(half_life_images, max(images_in_stage * r, 1e-8))

    def state_dict(self) -> dict:
        return {"pl_mean": float(self.pl_mean)}

    def load_state_dict(self, state: dict) -> None:
        self.pl_mean = torch.tensor(float(state.get("pl_mean", 0.0)))

    def synthesize(self, G, ws, stage, images_in_stage=None):
        return G(ws=ws, noise="const")

    def discriminate(self, modules, stage, real, fake, labels=None):
        """D on real and fake images in two passes, as NVlabs' run_D does (its minibatch-std groups see one pass)."""
        return modules["D"](real, labels), modules["D"](fake, labels)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        G, D = modules["G"], modules["D"]
        p, gen, dev = self.p, ctx.generator, ctx.device
        real = batch["image"]
        n, num_ws = real.shape[0], self.num_ws(stage)
        labels = self.batch_labels(batch)  # generated images take the batch's labels (the data's class balance)
        gamma = self.r1_gamma()
        out: dict[str, float] = {}

        # --- G main: non-saturating logistic; w_avg is tracked here only (NVlabs also updates it in the other
        # generator passes, so its estimate moves somewhat faster there)
        z, z2, cut = self.mixing_latents(n, ctx, num_ws)
        with ctx.no_sync(D):
            with ctx.autocast():
                img = G(z, labels, z2=z2, cutoff=cut, generator=gen, update_w_avg=True)
                d_gen = D(self.d_input(img.float(), ctx), labels).float()
            g_loss = losses.g_loss("non-saturating", d_gen)
            opts["G"].zero_grad(set_to_none=True)
            g_loss.backward()
        opts["G"].step()

        # --- G reg: lazy path-length regularization on a smaller batch, scaled by its interval
        if p.pl_weight > 0 and ctx.step % p.pl_interval == 0:
            m = max(1, n // p.pl_batch_shrink)
            z, z2, cut = self.mixing_latents(m, ctx, num_ws)
            lab = None if labels is None else labels[:m]
            with ctx.autocast():
                img, ws = G(z, lab, z2=z2, cutoff=cut, generator=gen, return_ws=True)
            pen, self.pl_mean = regularizers.path_length_penalty(img.float(), ws, self.pl_mean.to(dev), p.pl_decay,
                                                                 generator=gen)
            self.pl_mean = self.pl_mean.detach().cpu()
            loss_pl = pen * p.pl_weight * p.pl_interval
            opts["G"].zero_grad(set_to_none=True)
            (img[:, 0, 0, 0].float() * 0).sum().add(loss_pl).backward()  # * 0: every parameter in the graph (DDP)
            opts["G"].step()
            out.update(pl_penalty=float(pen.detach()), loss_pl=float(loss_pl.detach()))

        # --- D main
        z, z2, cut = self.mixing_latents(n, ctx, num_ws)
        with torch.no_grad(), ctx.autocast():
            fake = G(z, labels, z2=z2, cutoff=cut, generator=gen).float()
        with ctx.autocast():
            d_fake = D(self.d_input(fake, ctx), labels).float()
            d_real = D(self.d_input(real, ctx), labels).float()
        d_loss = losses.d_loss("non-saturating", d_real, d_fake)
        self.d_feedback(d_real)  # ADA / Diffusion-GAN
        opts["D"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["D"].step()

        # --- D reg: lazy R1 on the reals, scaled by its interval
        if gamma > 0 and ctx.step % p.r1_interval == 0:
            x = real.detach().requires_grad_(True)
            with ctx.autocast():
                logits = D(self.d_input(x, ctx), labels).float()
            r1 = regularizers.r1_penalty(logits, x)
            loss_r1 = r1 * (gamma / 2) * p.r1_interval
            opts["D"].zero_grad(set_to_none=True)
            (logits * 0).sum().add(loss_r1).backward()
            opts["D"].step()
            out.update(r1_penalty=float(r1.detach()), loss_r1=float(loss_r1.detach()))

        out.update(loss_g=float(g_loss.detach()), loss_d=float(d_loss.detach()), d_real=float(d_real.mean().detach()),
                   d_fake=float(d_fake.mean().detach()), pl_mean=float(self.pl_mean),
                   mixed=float(z2 is not None))
        return out
