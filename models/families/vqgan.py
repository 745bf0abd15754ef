"""VQ-GAN (Esser et al. 2020, "Taming Transformers for High-Resolution Image Synthesis").

Three stages of different kinds, behind the same family interface:

1. ``vqgan-1-autoencoder`` (train): convolutional encoder -> vector quantizer ->
   decoder, trained with L1 (+ LPIPS when its weights are configured) + the
   codebook/commitment terms + a PatchGAN hinge loss switched on after
   ``disc_start`` steps and weighted adaptively at the decoder's last layer.
2. ``vqgan-2-tokens`` (prepare): every shard encoded into code-index grids by the shared preparation stage
   (tasks/prepare.py, with :meth:`VQGAN.prepare_encode`); no training.
3. ``vqgan-3-prior`` (train): a GPT over the flattened code grid (models/nn/gpt.py),
   trained on the token shards; the frozen autoencoder rides along in the
   checkpoint so the stage samples images by itself (prior -> decoder).

The architecture follows taming-transformers' ``Encoder``/``Decoder``/
``NLayerDiscriminator`` (ResNet blocks, self-attention at the lowest resolution,
1x1 convs into and out of the quantizer), written afresh and sized for small
images.

``tokenizer: vit`` makes stage 1 a ViT-VQGAN (Yu et al. 2021, "Vector-quantized Image Modeling with Improved
VQGAN"): a Vision Transformer encoder and decoder over p x p patches (models/nn/vit.py) and factorized codes, the
encoder output projected to a ``lookup_dim``-dimensional space where it and the codebook are l2-normalized and
the nearest code is the one of largest cosine similarity; the quantized vector is projected back up for the
decoder. The tokens and prior stages see only ``encode_codes`` / ``decode_codes`` and the code grid.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ganforge.models import losses
from ganforge.models.family import Betas, GANFamily, Section, StageSpec, StepContext
from ganforge.models.nn.lpips import LPIPS, load_lpips
from ganforge.models.nn.patchgan import PatchDiscriminator

log = logging.getLogger("ganforge.vqgan")

AUTOENCODER, TOKENS, PRIOR = "vqgan-1-autoencoder", "vqgan-2-tokens", "vqgan-3-prior"


class VQGANParams(Section):
    """VQ-GAN: autoencoder (stage 1) -> code extraction (stage 2) -> transformer prior (stage 3)."""

    # autoencoder
    tokenizer: Literal["conv", "vit"] = Field(
        "conv", description="conv: taming's convolutional autoencoder; vit: ViT-VQGAN (transformer encoder and "
                            "decoder over patches, factorized l2-normalized codes)")
    rec_loss: Literal["l1", "l2"] | None = Field(None, description="reconstruction loss; null: l1 (conv, as "
                                                                   "taming), l2 (vit, as ViT-VQGAN)")
    ch: int = Field(32, ge=4, description="base channels of encoder/decoder")
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 2],
                               description="channel multiplier per level; downsampling factor f = 2^(len-1)")
    num_res_blocks: int = Field(1, ge=1)
    attention: bool = Field(True, description="self-attention at the lowest resolution")
    z_channels: int = Field(32, ge=1)
    embed_dim: int = Field(32, ge=1, description="codebook vector dimension d")
    n_embed: int = Field(128, ge=2, le=32767, description="codebook size K")
    beta: float = Field(0.25, ge=0, description="commitment weight")
    patch_size: int = Field(4, ge=1, description="vit: p x p patches, one token each (grid = resolution / p)")
    vit_dim: int = Field(64, ge=8, description="vit: transformer width")
    vit_depth: int = Field(2, ge=1, description="vit: blocks in the encoder and in the decoder")
    vit_heads: int = Field(4, ge=1, description="vit: attention heads")
    vit_mlp_ratio: float = Field(4.0, gt=0, description="vit: MLP width / transformer width")
    lookup_dim: int = Field(8, ge=1, description="vit: dimension of the factorized, l2-normalized code lookup")
    legacy_beta: bool = Field(False, description="taming's legacy loss: beta on the codebook term instead")
    restart_every: int = Field(100, ge=0, description="steps between dead-code restarts (0: never)")
    lr: float = Field(2e-4, gt=0)
    betas: Betas = (0.5, 0.9)
    disc_start: int = Field(500, ge=0, description="steps before the PatchGAN loss switches on")
    disc_weight: float = Field(0.8, ge=0, description="factor on the adaptive GAN weight")
    disc_ch: int = Field(32, ge=4)
    disc_layers: int = Field(2, ge=1)
    perceptual_weight: float = Field(1.0, ge=0)
    lpips_vgg_path: str | None = Field(None, description="torchvision VGG16 state dict for LPIPS; None: L1 only")
    lpips_lin_path: str | None = Field(None, description="LPIPS linear heads (lpips' weights/v0.1/vgg.pth)")
    autoencoder_kimg: float = Field(20.0, gt=0, description="thousands of images for stage 1")
    ema: bool = Field(False, description="keep EMA copies (uses train.ema_half_life_kimg)")
    # tokens
    token_workers: int = Field(2, ge=1, description="Ray tasks encoding shards in stage 2")
    # prior
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    prior_classes: int = Field(0, ge=0, description="0: unconditional; N: class-conditional on labels 0..N-1")
    prior_lr: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW, on linear weights only")
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0: off")
    prior_kimg: float = Field(20.0, gt=0, description="thousands of token grids for stage 3")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)

    @field_validator("ch_mult")
    @classmethod
    def _mult(cls, v: list[int]) -> list[int]:
        if not v or any(m < 1 for m in v):
            raise ValueError(f"must be a non-empty list of positive integers, got {v}")
        return v


    @model_validator(mode="after")
    def _heads(self) -> "VQGANParams":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim ({self.vit_dim}) must be divisible by vit_heads ({self.vit_heads})")
        return self


def _norm(ch: int) -> nn.GroupNorm:
    groups = math.gcd(32, ch)
    return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (taming's AttnBlock), via scaled_dot_product_attention."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, attn: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        cin = ch
        for level, mult in enumerate(ch_mult):
            cout = ch * mult
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, dropout))
                cin = cout
            if level != len(ch_mult) - 1:
                blocks.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))  # downsample by 2
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, dropout), AttnBlock(cin) if attn else nn.Identity(),
                                 ResnetBlock(cin, cin, dropout))
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, attn: bool,
                 dropout: float = 0.0):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, dropout), AttnBlock(cin) if attn else nn.Identity(),
                                 ResnetBlock(cin, cin, dropout))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, dropout))
                cin = cout
            if level != 0:
                blocks.append(Upsample(cin))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with the straight-through estimator.

    loss = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2 (van den Oord et al. 2017): the codebook
    term moves the codes, the beta-weighted commitment term keeps the encoder near them.
    taming-transformers' default (``legacy=True``) puts beta on the codebook term instead;
    ``legacy=True`` here reproduces that for comparison.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        # code use since the last dead-code restart, summed over all ranks (identical on every rank)
        self.register_buffer("usage", torch.zeros(n_embed), persistent=True)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d, h, w] -> nearest code indices [B, h, w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
        e = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> quantized vectors [B, d, h, w]."""
        return self.embedding(idx).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        idx = self.codes(z)
        zq = self.lookup(idx).to(z.dtype)
        codebook = F.mse_loss(zq, z.detach())
        commitment = F.mse_loss(z, zq.detach())
        loss = self.beta * codebook + commitment if self.legacy else codebook + self.beta * commitment
        zq = z + (zq - z).detach()  # straight-through: d zq / d z = I
        return zq, loss, {"indices": idx, "codebook_loss": codebook.detach(), "commitment_loss": commitment.detach()}


class L2VectorQuantizer(VectorQuantizer):
    """ViT-VQGAN's lookup: inputs and codes l2-normalized, the nearest code by cosine similarity (on the unit
    sphere, the smallest Euclidean distance is the largest dot product); the VQ terms are measured between the
    normalized vectors, the codebook term moving the codes and beta on the commitment term."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False):
        super().__init__(n_embed, embed_dim, beta, legacy)
        nn.init.normal_(self.embedding.weight)  # directions uniform on the sphere

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float(), dim=1)
        sim = flat @ F.normalize(self.embedding.weight.float(), dim=1).t()
        return sim.argmax(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(idx), dim=-1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return super().forward(F.normalize(z, dim=1))


def codebook_stats(indices: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Fraction of codes used and the perplexity exp(H(p)) of the code histogram."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_embed).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


class VQModel(nn.Module):
    def __init__(self, ch: int, ch_mult, num_res_blocks: int, z_channels: int, embed_dim: int, n_embed: int,
                 beta: float, legacy: bool, attn: bool, dropout: float = 0.0):
        super().__init__()
        self.encoder = Encoder(ch, tuple(ch_mult), num_res_blocks, z_channels, attn, dropout)
        self.decoder = Decoder(ch, tuple(ch_mult), num_res_blocks, z_channels, attn, dropout)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, legacy)
        self.downsample = 2 ** (len(ch_mult) - 1)

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output in the codebook's space [B, d, h, w] (what dead codes restart onto)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return self.quantize(self.pre_quant(x))

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.pre_quant(x))

    def decode_codes(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.lookup(idx))

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        zq, qloss, info = self.encode(x)
        return self.decode(zq), qloss, info


class ViTVQModel(VQModel):
    """ViT-VQGAN's autoencoder: the same interface as :class:`VQModel` (encode / decode, codes in and out, the
    decoder's last layer for the adaptive GAN weight), with a ViT encoder and decoder and factorized codes:
    Linear(D -> lookup_dim) into the l2-normalized lookup, Linear(lookup_dim -> D) out of it."""

    def __init__(self, resolution: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 lookup_dim: int, n_embed: int, beta: float, legacy: bool, dropout: float = 0.0):
        nn.Module.__init__(self)
        from ganforge.models.nn.vit import ViTDecoder, ViTEncoder

        self.encoder = ViTEncoder(resolution, patch, dim, depth, heads, mlp_ratio, dropout)
        self.decoder = ViTDecoder(resolution, patch, dim, depth, heads, mlp_ratio, dropout)
        self.quant_conv = nn.Conv2d(dim, lookup_dim, 1)  # per token: a linear projection
        self.post_quant_conv = nn.Conv2d(lookup_dim, dim, 1)
        self.quantize = L2VectorQuantizer(n_embed, lookup_dim, beta, legacy)
        self.downsample = patch

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.quant_conv(self.encoder(x)), dim=1)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.to_pixels.weight


# ----------------------------------------------------------------------------- the family


class VQGAN(GANFamily):
    name = "vqgan"
    contract_overrides = {"ch": 4, "ch_mult": [1, 2], "z_channels": 4,
                          "embed_dim": 4, "n_embed": 16, "disc_start": 0,
                          "disc_ch": 4, "disc_layers": 1, "n_layer": 1,
                          "n_head": 2, "n_embd": 16, "warmup_steps": 1,
                          "token_workers": 1}
    # the PatchGAN's biases: before a BatchNorm they cancel out, and the last one's hinge gradient is zero while
    # every logit is inside the margin (as many real as fake patches)
    contract_untouched = ("D.main.*.bias",)
    contract_batch_coupled = ("taming-transformers' BatchNorm PatchGAN over separate batches of inputs and "
                              "reconstructions (no adaptive augmentation reads its scores)")
    contract_variants = {"vit": {"tokenizer": "vit", "patch_size": 4, "vit_dim": 8, "vit_depth": 1, "vit_heads": 2,
                                 "lookup_dim": 4}}
    Params = VQGANParams
    supports_truncation = True  # nucleus (top-p) sampling of the prior: psi is the kept probability mass

    def __init__(self, params):
        super().__init__(params)
        f = self.p.patch_size if self.p.tokenizer == "vit" else 2 ** (len(self.p.ch_mult) - 1)
        self.grid_hw = params.resolution // f
        self.n_tokens = self.grid_hw**2
        self.latent_dim = self.n_tokens  # one N(0,1) per token, mapped to the uniform that draws it
        self.num_classes = self.p.prior_classes
        self.rec_loss = self.p.rec_loss or ("l2" if self.p.tokenizer == "vit" else "l1")
        self._lpips: LPIPS | None = None
        self._lpips_loaded = False

    @classmethod
    def check_params(cls, train, section: VQGANParams) -> None:
        if section.tokenizer == "vit":
            p = section.patch_size
            if train.resolution % p or train.resolution // p < 2:
                raise ValueError(f"train.{cls.name}.patch_size {p} must divide train.resolution {train.resolution} "
                                 f"into a grid of at least 2x2 patches")
        f = 2 ** (len(section.ch_mult) - 1)
        if section.tokenizer == "conv" and train.resolution // f < 2:
            raise ValueError(f"train.{cls.name}.ch_mult downsamples by {f}: too much for train.resolution "
                             f"{train.resolution}")
        if train.resolution < 3 * 2**section.disc_layers:
            raise ValueError(f"train.{cls.name}.disc_layers={section.disc_layers} is too deep for {train.resolution}px "
                             f"images (the PatchGAN needs resolution >= 3 * 2^disc_layers)")

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        return {"autoencoder_kimg": kimg, "prior_kimg": kimg}

    # --- stages
    def stages(self) -> list[StageSpec]:
        r = self.params.resolution
        return [
            StageSpec(AUTOENCODER, 0, r, self.p.autoencoder_kimg, kind="train"),
            StageSpec(TOKENS, 1, r, 0.0, kind="prepare", info={"workers": self.p.token_workers, "output": "tokens"}),
            StageSpec(PRIOR, 2, r, self.p.prior_kimg, kind="train",
                      info={"data": "tokens", "prepared": "tokens", "grid": self.grid_hw}),
        ]

    def plot_key(self, stage: StageSpec) -> str:
        return "loss_prior" if stage.name == PRIOR else "loss_rec"

    def can_sample(self, stage: StageSpec) -> bool:
        return stage.name == PRIOR

    def ema_names(self, stage: StageSpec) -> tuple[str, ...]:
        return ("VQ",) if stage.name != PRIOR else ("GPT", "VQ")

    def use_ema(self, stage: StageSpec) -> bool:
        return self.p.ema

    def notes(self, stage: StageSpec) -> dict[str, str]:
        if stage.name != AUTOENCODER:
            return {}
        _, reason = self.perceptual()
        p, g = self.p, self.grid_hw
        kind = (f"vit: {g}x{g} tokens of {p.patch_size}x{p.patch_size} patches, width {p.vit_dim}, depth "
                f"{p.vit_depth}, l2-normalized {p.lookup_dim}-d lookup" if p.tokenizer == "vit"
                else f"conv: {g}x{g} tokens, {p.embed_dim}-d codes")
        return {"perceptual_loss": reason, "tokenizer": f"{kind}, codebook {p.n_embed}, {self.rec_loss} "
                                                        f"reconstruction"}

    def vq_model(self) -> VQModel:
        p = self.p
        if p.tokenizer == "vit":
            return ViTVQModel(self.params.resolution, p.patch_size, p.vit_dim, p.vit_depth, p.vit_heads,
                              p.vit_mlp_ratio, p.lookup_dim, p.n_embed, p.beta, p.legacy_beta)
        return VQModel(p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.embed_dim, p.n_embed, p.beta,
                       p.legacy_beta, p.attention)

    def gpt(self):
        from ganforge.models.nn.gpt import GPT

        p = self.p
        return GPT(p.n_embed, self.n_tokens, p.n_layer, p.n_head, p.n_embd, max(1, p.prior_classes), p.dropout)

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        if stage.name == AUTOENCODER:
            return {"VQ": self.vq_model(), "D": PatchDiscriminator(self.p.disc_ch, self.p.disc_layers)}
        if stage.name == TOKENS:
            return {"VQ": self.vq_model()}
        return {"GPT": self.gpt(), "VQ": self.vq_model().requires_grad_(False)}

    def grow(self, modules, previous) -> None:
        if "VQ" in modules and "VQ" not in previous:
            raise ValueError("the prior stage starts from the autoencoder's checkpoint, which has no 'VQ' weights")
        super().grow({k: m for k, m in modules.items() if k in previous}, previous)

    def optimizers(self, modules):
        p = self.p
        if "GPT" in modules:
            from ganforge.models.nn.gpt import adamw_param_groups

            return {"GPT": torch.optim.AdamW(adamw_param_groups(modules["GPT"], p.weight_decay), lr=p.prior_lr,
                                             betas=(0.9, 0.95))}
        return {
            "VQ": torch.optim.Adam(modules["VQ"].parameters(), lr=p.lr, betas=tuple(p.betas)),
            "D": torch.optim.Adam(modules["D"].parameters(), lr=p.lr, betas=tuple(p.betas)),
        }

    # --- training
    def perceptual(self) -> tuple[LPIPS | None, str]:
        if not self._lpips_loaded:
            self._lpips, self._lpips_reason = load_lpips(self.p.lpips_vgg_path, self.p.lpips_lin_path)
            self._lpips_loaded = True
            (log.info if self._lpips is not None else log.warning)("VQ-GAN perceptual loss %s", self._lpips_reason)
        return self._lpips, self._lpips_reason

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        if stage.name == PRIOR:
            return self._prior_step(modules, opts, batch["tokens"], batch.get("label"), stage, ctx)
        return self._autoencoder_step(modules, opts, batch["image"], ctx)

    def _autoencoder_step(self, modules, opts, real, ctx: StepContext) -> dict[str, float]:
        VQ, D, p = modules["VQ"], modules["D"], self.p
        inner = VQ.module if hasattr(VQ, "module") else VQ
        gan_on = ctx.step >= p.disc_start
        with ctx.autocast():
            rec, qloss, info = VQ(real)
        rec = rec.float()
        l1 = (real - rec).abs().mean()
        rec_loss = l1 if self.rec_loss == "l1" else (real - rec).pow(2).mean()
        lp, _ = self.perceptual()
        metrics: dict[str, float] = {}
        if lp is not None:
            lp.to(real.device)
            perc = lp(real, rec).mean()
            rec_loss = rec_loss + p.perceptual_weight * perc
            metrics["perceptual"] = float(perc.detach())
        loss = rec_loss + qloss.float()
        if gan_on:
            with ctx.no_sync(D):  # D's gradients from the generator pass are local and discarded
                with ctx.autocast():
                    g_loss = losses.g_loss("hinge", D(self.d_input(rec, ctx)).float())
                last = inner.last_layer()
                (g_rec,) = torch.autograd.grad(rec_loss, last, retain_graph=True)
                (g_gan,) = torch.autograd.grad(g_loss, last, retain_graph=True)
                d_weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * p.disc_weight
                loss = loss + d_weight * g_loss
                opts["VQ"].zero_grad(set_to_none=True)
                loss.backward()
            metrics.update(loss_g=float(g_loss.detach()), d_weight=float(d_weight))
        else:
            opts["VQ"].zero_grad(set_to_none=True)
            loss.backward()
        opts["VQ"].step()
        if gan_on:
            with ctx.autocast():
                d_real, d_fake = (o.float() for o in self.discriminate(modules, None, self.d_input(real, ctx),
                                                                       self.d_input(rec.detach(), ctx)))
            d_loss = 0.5 * losses.d_loss("hinge", d_real, d_fake)  # taming's 0.5 factor
            opts["D"].zero_grad(set_to_none=True)
            d_loss.backward()
            opts["D"].step()
            metrics.update(loss_d=float(d_loss.detach()), d_real=float(d_real.mean().detach()),
                           d_fake=float(d_fake.mean().detach()))
        restarted = 0
        if p.restart_every:
            restart_now = (ctx.step + 1) % p.restart_every == 0
            with torch.no_grad():
                z = inner.pre_quant(real) if restart_now else None
            restarted = self._restart_dead_codes(inner.quantize, info["indices"], z, ctx)
        # the codebook and commitment terms are the same squared distance; only their gradients differ
        metrics.update(loss_rec=float(rec_loss.detach()), l1=float(l1.detach()), loss_q=float(qloss.detach()),
                       vq_mse=float(info["codebook_loss"]), restarted_codes=float(restarted),
                       **codebook_stats(info["indices"], p.n_embed))
        return metrics

    @torch.no_grad()
    def _restart_dead_codes(self, q: VectorQuantizer, indices: torch.Tensor, z: torch.Tensor | None,
                            ctx: StepContext) -> int:
        """Count code use (all ranks); every ``restart_every`` steps move codes unused since the last
        restart onto randomly chosen encoder outputs of this batch (rank 0's, broadcast), so replicas stay equal."""
        import torch.distributed as dist

        counts = torch.bincount(indices.reshape(-1), minlength=q.n_embed).float()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        q.usage.add_(counts.to(q.usage.device))
        if z is None:
            return 0
        dead = (q.usage == 0).nonzero().flatten()
        n = int(dead.numel())
        if n:
            flat = z.permute(0, 2, 3, 1).reshape(-1, q.embed_dim)
            pick = torch.randint(0, flat.shape[0], (n,), generator=ctx.generator).to(flat.device)
            new = flat[pick].to(q.embedding.weight.dtype)
            if distributed:
                dist.broadcast(new, 0)
            q.embedding.weight.data[dead.to(q.embedding.weight.device)] = new
        q.usage.zero_()
        return n

    def _prior_step(self, modules, opts, tokens, labels, stage, ctx: StepContext) -> dict[str, float]:
        from ganforge.models.nn.gpt import cosine_lr

        p = self.p
        total = max(1, int(math.ceil(stage.kimg * 1000 / self.params.batch_size)))
        lr = cosine_lr(ctx.step, total, p.prior_lr, p.warmup_steps)
        for g in opts["GPT"].param_groups:
            g["lr"] = lr
        seq = tokens.reshape(tokens.shape[0], -1).long()
        cond = self._labels(labels, seq.shape[0], seq.device)
        with ctx.autocast():
            logits = modules["GPT"](seq[:, :-1], cond)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seq.reshape(-1))
        opts["GPT"].zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(modules["GPT"].parameters(), p.grad_clip)
        opts["GPT"].step()
        return {"loss_prior": float(loss.detach()), "bits_per_token": float(loss.detach()) / math.log(2), "lr": lr}

    def _labels(self, labels: torch.Tensor | None, n: int, device) -> torch.Tensor:
        if not self.p.prior_classes:
            return torch.zeros(n, dtype=torch.long, device=device)
        if labels is None or (labels < 0).any() or (labels >= self.p.prior_classes).any():
            raise ValueError(f"train.vqgan.prior_classes={self.p.prior_classes} needs every sample to have a label "
                             f"in [0, {self.p.prior_classes}); got {None if labels is None else labels.tolist()[:8]}")
        return labels.long().to(device)

    # --- sampling
    def can_reconstruct(self, stage: StageSpec) -> bool:
        return True

    def reconstruct(self, ema, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ema["VQ"](x)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        if "GPT" not in ema:
            raise ValueError(f"stage {stage.name} is the autoencoder: it reconstructs but has no sampler; "
                             f"use the {PRIOR} checkpoint")
        from ganforge.models.nn.gpt import sample

        u = torch.special.ndtr(z.float())  # N(0,1) latents -> uniforms: one per token
        if labels is None and self.num_classes:  # direct calls: classes in turn (sample() passes them)
            labels = torch.arange(z.shape[0], device=z.device) % self.num_classes
        cond = self._labels(labels, z.shape[0], z.device)
        top_p = self.p.top_p
        if truncation is not None and truncation < 1.0:
            if not truncation > 0:
                raise ValueError(f"truncation must be in (0, 1], got {truncation}")
            top_p = truncation if top_p is None else min(top_p, truncation)
        idx = sample(ema["GPT"], cond, (self.grid_hw, self.grid_hw), u[:, : self.n_tokens],
                     temperature=self.p.temperature, top_k=self.p.top_k, top_p=top_p)
        return ema["VQ"].decode_codes(idx).float().clamp(-1, 1)

    score_directions = {"codebook_usage": "higher", "codebook_perplexity": "higher"}

    def extra_scores(self, ema, stage, batches) -> dict[str, float]:
        """Codebook use of the reference split (how much of the codebook the autoencoder really uses)."""
        if "VQ" not in ema:
            return {}
        codes = []
        with torch.inference_mode():
            for b in batches():
                codes.append(ema["VQ"].encode_codes(b["image"]))
        st = codebook_stats(torch.cat(codes), ema["VQ"].quantize.n_embed)
        return {"codebook_usage": st["codebook_usage"], "codebook_perplexity": st["perplexity"],
                "codebook_size": float(ema["VQ"].quantize.n_embed)}

    def discriminate(self, modules, stage, real, fake, labels=None):
        """The autoencoder stage's PatchGAN on inputs and reconstructions, in two passes as taming-transformers
        does (the other stages have no D)."""
        if "D" not in modules:
            return None
        return modules["D"](real), modules["D"](fake)

    # --- the tokens stage (a preparation stage: tasks/prepare.py reads, writes and caches the shards)
    def prepare_encode(self, ema, stage, images):
        """Each image -> its int16 code grid as ``<key>.npy``; counts: the code histogram."""
        vq = ema["VQ"]
        codes = vq.encode_codes(images).numpy().astype(np.int16)
        fields = []
        for c in codes:
            buf = io.BytesIO()
            np.save(buf, c, allow_pickle=False)
            fields.append({"npy": buf.getvalue()})
        hist = np.bincount(codes.reshape(-1).astype(np.int64), minlength=vq.quantize.n_embed)
        return fields, {"codes": hist}

    def prepare_manifest(self, stage, ema, counts):
        """kind "tokens" (what TokenStream reads), the grid and codebook size; per split the codebook's use."""
        n_embed = ema["VQ"].quantize.n_embed
        per_split = {}
        for split, c in counts.items():
            hist = c.get("codes", np.zeros(n_embed, np.int64))
            p = hist / max(1, hist.sum())
            nz = p[p > 0]
            per_split[split] = {"codebook_usage": float((hist > 0).mean()),
                                "perplexity": float(np.exp(-(nz * np.log(nz)).sum())), "codes_used": int((hist > 0).sum())}
        return ({"kind": "tokens", "grid": [self.grid_hw, self.grid_hw], "codebook_size": int(n_embed),
                 "dtype": "int16"}, per_split)

    def grid(self, ema, stage, seeds, real_fn, images_in_stage=None) -> torch.Tensor:
        if stage.name == PRIOR:
            return super().grid(ema, stage, seeds, real_fn, images_in_stage)
        real = real_fn()
        rec = self.reconstruct(ema, real)
        n = self.params.grid_size
        # alternate rows: inputs, then their reconstructions
        rows = []
        for i in range(0, len(real), n):
            rows += [real[i : i + n], rec[i : i + n]]
        return torch.cat(rows)[: len(real)]
