"""Families defined outside ganforge, found through the ``ganforge.families`` entry point group of the
``ganforge-testfamilies`` distribution beside this file (tests/conftest.py puts this folder on sys.path and
PYTHONPATH, as installing a package would; Ray workers, CLI subprocesses and `dvc repro` see them too).

- ``toyvae``: a small VAE trained by its ELBO, in two chained stages: a family without a discriminator,
  with family state (a KL warm-up counter) that must survive resume exactly.
- ``brokenresume``: the toy VAE with its family state left out of checkpoints: the contract test must fail it.
- ``toyinvert``: an image-to-image family (CycleGAN's shape) whose registered model translates images.
- ``progan_faulty`` / ``vqgan_faulty`` / ``stylegan2_faulty`` / ``cyclegan_faulty``: ProGAN / VQ-GAN / StyleGAN2 / CycleGAN that kill their own worker once, at a configured
  stage, step and rank (a marker file makes it happen once): how the tests inject failures from outside
  instead of through hooks in ganforge's production path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ganforge.models.families.cyclegan import CycleGAN, CycleGANParams
from ganforge.models.families.progan import ProGAN, ProGANParams
from ganforge.models.families.stylegan2 import StyleGAN2, StyleGAN2Params
from ganforge.models.families.vqgan import VQGAN, VQGANParams
from ganforge.models.family import GANFamily, Section, StageSpec, StepContext

log = logging.getLogger("ganforge.testfamilies")


# ----------------------------------------------------------------------------- toyvae


class ToyVAEParams(Section):
    """A toy VAE (tests and the README's "adding a family"): encoder/decoder convs, ELBO, no discriminator."""

    latent_dim: int = Field(8, ge=1)
    width: int = Field(16, ge=4, description="channels of the conv layers")
    stages: int = Field(2, ge=1, le=4, description="chained stages; each continues from the previous")
    stage_kimg: float = Field(0.128, gt=0, description="thousands of images per stage")
    lr: float = Field(2e-3, gt=0)
    kl_weight: float = Field(0.05, ge=0)
    kl_warmup_steps: int = Field(20, ge=0, description="the KL weight ramps up over this many steps (family state)")
    extra_batches: int = Field(0, ge=0, description="batches drawn inside each step (ctx.next_batch, as n_critic)")


class _Encoder(nn.Module):
    def __init__(self, res: int, width: int, latent: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 4, 2, 1), nn.SiLU(),
                                 nn.Flatten(), nn.Linear(width * (res // 4) ** 2, 2 * latent))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)


class _Decoder(nn.Module):
    def __init__(self, res: int, width: int, latent: int):
        super().__init__()
        self.res, self.width = res, width
        self.fc = nn.Linear(latent, width * (res // 4) ** 2)
        self.net = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.width, self.res // 4, self.res // 4))


class ToyVAE(GANFamily):
    name = "toyvae"
    Params = ToyVAEParams
    ema_modules = ("Dec",)

    def __init__(self, params):
        super().__init__(params)
        self.latent_dim = self.p.latent_dim
        self.steps_seen = 0  # family state: drives the KL warm-up across stages and resumes

    @classmethod
    def check_params(cls, train, section: ToyVAEParams) -> None:
        if train.resolution < 4:
            raise ValueError("train.toyvae needs train.resolution >= 4")

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        return {"stage_kimg": kimg}

    def stages(self) -> list[StageSpec]:
        r = self.params.resolution
        return [StageSpec(f"toyvae-{i + 1}", i, r, self.p.stage_kimg) for i in range(self.p.stages)]

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        r, w, z = stage.resolution, self.p.width, self.p.latent_dim
        return {"Enc": _Encoder(r, w, z), "Dec": _Decoder(r, w, z)}

    def plot_key(self, stage: StageSpec) -> str:
        return "loss_elbo"

    def optimizers(self, modules):
        params = list(modules["Enc"].parameters()) + list(modules["Dec"].parameters())
        return {"VAE": torch.optim.Adam(params, lr=self.p.lr)}

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = int(state.get("steps_seen", 0))

    def kl_weight(self) -> float:
        warm = self.p.kl_warmup_steps
        return self.p.kl_weight * (1.0 if warm == 0 else min(1.0, self.steps_seen / warm))

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        x = batch["image"]
        if self.p.extra_batches:  # fresh real batches inside one step, as WGAN's n_critic or BigGAN's D steps
            x = torch.cat([x] + [ctx.next_batch()["image"] for _ in range(self.p.extra_batches)])
        mu, logvar = modules["Enc"](x)
        eps = torch.randn(mu.shape, generator=ctx.generator).to(ctx.device)
        rec = modules["Dec"](mu + eps * (0.5 * logvar).exp())
        rec_loss = F.mse_loss(rec, x, reduction="none").flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        w = self.kl_weight()
        loss = rec_loss + w * kl
        opts["VAE"].zero_grad(set_to_none=True)
        loss.backward()
        opts["VAE"].step()
        self.steps_seen += 1
        return {"loss_elbo": float((rec_loss + kl).detach()), "loss_rec": float(rec_loss.detach()),
                "kl": float(kl.detach()), "kl_weight": w, "steps_seen": float(self.steps_seen)}

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        return ema["Dec"](z).float().clamp(-1, 1)


class BrokenResume(ToyVAE):
    """The toy VAE with a deliberate bug: its step counter (which drives the KL warm-up) is not checkpointed, so a
    resumed run restarts the warm-up. tests/test_family_contract.py shows the contract catches it."""

    name = "brokenresume"

    def state_dict(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- a translator


class ToyInvertParams(Section):
    """A toy image-to-image family (tests): learns x -> -x."""

    width: int = Field(8, ge=2)
    stage_kimg: float = Field(0.064, gt=0)
    lr: float = Field(5e-3, gt=0)


class ToyInvert(GANFamily):
    name = "toyinvert"
    Params = ToyInvertParams
    product = "translator"
    ema_modules = ("T",)

    def stages(self) -> list[StageSpec]:
        return [StageSpec("toyinvert", 0, self.params.resolution, self.p.stage_kimg)]

    def build(self, stage):
        w = self.p.width
        return {"T": nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.SiLU(), nn.Conv2d(w, 3, 3, 1, 1), nn.Tanh())}

    def optimizers(self, modules):
        return {"T": torch.optim.Adam(modules["T"].parameters(), lr=self.p.lr)}

    def train_step(self, modules, opts, batch, stage, ctx):
        x = batch["image"]
        loss = (modules["T"](x) + x).abs().mean()
        opts["T"].zero_grad(set_to_none=True)
        loss.backward()
        opts["T"].step()
        return {"loss_l1": float(loss.detach())}

    def can_sample(self, stage) -> bool:
        return False

    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None):
        raise ValueError("toyinvert translates images; it does not generate")

    @torch.no_grad()
    def translate(self, ema, stage, images):
        return ema["T"](images).float().clamp(-1, 1)


# ----------------------------------------------------------------------------- fault injection


class FaultParams(Section):
    fail_stage: str | None = Field(None, description="kill the worker in this stage ...")
    fail_step: int = Field(0, ge=0, description="... before this step ...")
    fail_rank: int = Field(0, ge=0, description="... on this rank ...")
    fail_marker: str | None = Field(None, description="... once: the marker file records that it happened")


class _KillsItsWorkerOnce:
    def train_step(self, modules, opts, batch, stage, ctx):
        import torch.distributed as dist

        p = self.p
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if p.fail_marker and stage.name == p.fail_stage and ctx.step == p.fail_step and rank == p.fail_rank:
            marker = Path(p.fail_marker)
            if not marker.exists():
                marker.write_text(f"killed {stage.name} step {ctx.step} rank {rank}\n")
                log.warning("injected failure: killing worker rank %d at step %d", rank, ctx.step)
                os._exit(1)
        return super().train_step(modules, opts, batch, stage, ctx)


class FaultyProGANParams(ProGANParams, FaultParams):
    """ProGAN that kills one of its workers once (tests only)."""


class FaultyProGAN(_KillsItsWorkerOnce, ProGAN):
    name = "progan_faulty"
    Params = FaultyProGANParams


class FaultyVQGANParams(VQGANParams, FaultParams):
    """VQ-GAN that kills one of its workers once (tests only)."""


class FaultyVQGAN(_KillsItsWorkerOnce, VQGAN):
    name = "vqgan_faulty"
    Params = FaultyVQGANParams


class FaultyStyleGAN2Params(StyleGAN2Params, FaultParams):
    """StyleGAN2 that kills one of its workers once (tests only)."""


class FaultyStyleGAN2(_KillsItsWorkerOnce, StyleGAN2):
    name = "stylegan2_faulty"
    Params = FaultyStyleGAN2Params


class FaultyCycleGANParams(CycleGANParams, FaultParams):
    """CycleGAN that kills one of its workers once (tests only)."""


class FaultyCycleGAN(_KillsItsWorkerOnce, CycleGAN):
    name = "cyclegan_faulty"
    Params = FaultyCycleGANParams


# ----------------------------------------------------------------------------- a metric from outside


def _register_metrics():
    import numpy as np

    from ganforge.tasks.metrics import register_metric

    @register_metric("mean_gap", "lower", "squared distance of the mean Inception features (FID's mean term)")
    def mean_gap(x):
        return {"mean_gap": float(np.sum((x.fake.astype(np.float64).mean(0) - x.real["mu"]) ** 2))}


_register_metrics()  # the `ganforge.metrics` entry point imports this module
