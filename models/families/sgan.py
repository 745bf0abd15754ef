"""The semi-supervised GAN (Odena 2016; Salimans et al. 2016, "Improved Techniques for Training GANs"): the
discriminator is a (K+1)-way classifier, K real classes plus "fake", and the product is that classifier.

- D's loss: cross-entropy over the K real classes on the labelled real images, plus the unsupervised GAN loss
  on unlabelled real images and fakes. With logits l (index K = fake), p(real | x) = sigmoid(d) for
  d = logsumexp(l[:K]) - l[K], so the unsupervised loss is the minimax D loss on d.
- G is trained by feature matching on D's last features (or the non-saturating loss).
- The data: shards made with ``ganforge shard --labelled-per-class N`` hold a ``labelled`` split of N images
  per class. Every batch mixes ``labelled_fraction`` of them with images of the train split, whose labels are
  not used (they count as unlabelled), so no rank ever gets a batch without labels.
- The baseline: a second copy of D's architecture (``C``) is trained supervised-only, by cross-entropy on the
  same labelled images of the same batches, for the same steps, in the same run. Evaluation reports both
  accuracies on the labelled val split (``accuracy``, ``baseline_accuracy``) and their gap: the point of SGAN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ganforge.models import losses
from ganforge.models.families.dcgan import Discriminator, Generator, feature_matching_loss
from ganforge.models.family import Betas, Section, SingleStageFamily, StageSpec, StepContext, score_together

LABELLED_SPLIT = "labelled"


class SGANParams(Section):
    """The semi-supervised GAN: a DCGAN generator and a (K+1)-way DCGAN-shaped discriminator, plus the
    supervised-only baseline classifier."""

    latent_dim: int = Field(100, ge=1)
    width: int = Field(32, ge=4, description="channels of G's last and D's first layer")
    kimg: float = Field(20.0, gt=0, description="thousands of images (labelled + unlabelled) shown to D")
    num_classes: int = Field(10, ge=2, description="K real classes (must match the shards)")
    labelled_fraction: float = Field(0.5, gt=0, lt=1, description="share of every batch taken from the labelled split")
    g_loss: Literal["feature-matching", "non-saturating"] = Field("feature-matching")
    d_norm: Literal["none", "batch", "layer"] = Field(
        "layer", description="D's normalisation (not batch: its statistics would mix reals and fakes at eval)")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout after each of D's layers (and the baseline's)")
    unsupervised_weight: float = Field(1.0, ge=0, description="weight of the unsupervised GAN loss in D's loss")
    lr_g: float = Field(2e-4, gt=0)
    lr_d: float = Field(2e-4, gt=0)
    betas: Betas = (0.5, 0.999)
    baseline: bool = Field(True, description="train the supervised-only baseline beside D (same data, same steps)")


class SGAN(SingleStageFamily):
    name = "sgan"
    contract_overrides = {"width": 4, "latent_dim": 8}
    Params = SGANParams
    product = "classifier"
    gate = ("accuracy", "higher")
    score_directions = {"accuracy": "higher", "baseline_accuracy": "higher", "accuracy_gain": "higher"}

    def __init__(self, params):
        super().__init__(params)
        self.latent_dim = self.p.latent_dim
        self.classes = self.p.num_classes  # the classifier's K; samples are unconditional (num_classes stays 0)
        self.ema_modules = ("G", "D", "C") if self.p.baseline else ("G", "D")

    @classmethod
    def check_params(cls, train, section: SGANParams) -> None:
        if train.resolution < 8:
            raise ValueError(f"train.{cls.name} needs train.resolution >= 8, got {train.resolution}")
        per_rank = train.batch_size // max(1, train.workers)
        if per_rank < 2:
            raise ValueError(f"train.{cls.name} mixes labelled and unlabelled images in every batch: it needs at "
                             f"least 2 images per worker (train.batch_size {train.batch_size}, {train.workers} workers)")

    def check_data(self, manifest: dict, shards) -> None:
        lab = (manifest.get("splits") or {}).get(LABELLED_SPLIT)
        if not lab or not lab.get("count"):
            raise ValueError(f"family {self.name} needs a labelled subset in {shards}: shard a labelled source with "
                             f"`ganforge shard --labelled-per-class N` (data.labelled_per_class)")
        classes = manifest.get("classes") or []
        if len(classes) != self.classes:
            raise ValueError(f"family {self.name} is set for {self.classes} classes but the shards in {shards} have "
                             f"{len(classes)}: set train.{self.name}.num_classes: {len(classes)}")

    def stage_info(self) -> dict:
        return {"data": "labelled", "labelled_fraction": self.p.labelled_fraction}

    def _d(self, resolution: int) -> Discriminator:
        p = self.p
        return Discriminator(resolution, p.width, norm=p.d_norm, out=p.num_classes + 1, dropout=p.dropout)

    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        r = stage.resolution
        mods = {"G": Generator(r, self.p.latent_dim, self.p.width), "D": self._d(r)}
        if self.p.baseline:
            mods["C"] = self._d(r)  # the same architecture, trained on the labels alone
        return mods

    def optimizers(self, modules):
        p = self.p
        opts = {"G": torch.optim.Adam(modules["G"].parameters(), lr=p.lr_g, betas=p.betas),
                "D": torch.optim.Adam(modules["D"].parameters(), lr=p.lr_d, betas=p.betas)}
        if "C" in modules:
            opts["C"] = torch.optim.Adam(modules["C"].parameters(), lr=p.lr_d, betas=p.betas)
        return opts

    def plot_key(self, stage: StageSpec) -> str:
        return "loss_sup"

    @staticmethod
    def real_logit(logits: torch.Tensor) -> torch.Tensor:
        """log p(real) - log p(fake) of (K+1)-way logits (the last one is "fake")."""
        return torch.logsumexp(logits[:, :-1], dim=1) - logits[:, -1]

    def discriminate(self, modules, stage, real, fake, labels=None):
        l_real, l_fake = score_together(modules["D"], real, fake)
        return self.real_logit(l_real), self.real_logit(l_fake)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        G, D = modules["G"], modules["D"]
        p, dev, gen = self.p, ctx.device, ctx.generator
        x, y = batch["image"], batch["label"]
        lab = y >= 0
        if not bool(lab.any()):
            raise ValueError(f"{self.name}: a batch without labelled images (the stream mixes them in every batch)")
        n = x.shape[0]
        z = torch.randn(n, p.latent_dim, generator=gen).to(dev)
        with torch.no_grad(), ctx.autocast():
            fake = G(z).float()

        # --- D: supervised CE over the K classes on labelled images + the GAN loss on every real image and fakes
        x_in = self.d_input(x, ctx)  # train.augment (DiffAugment); the baseline sees the same images
        with ctx.autocast():  # one pass: a BatchNorm D must not see which batch an image came from
            l_real, l_fake = (o.float() for o in score_together(D, x_in, self.d_input(fake, ctx)))
        sup = F.cross_entropy(l_real[lab, :-1], y[lab])
        unsup = losses.d_loss("minimax", self.real_logit(l_real), self.real_logit(l_fake))
        d_loss = sup + p.unsupervised_weight * unsup
        opts["D"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["D"].step()

        metrics = {"loss_sup": float(sup.detach()), "loss_unsup": float(unsup.detach()),
                   "train_accuracy": float((l_real[lab, :-1].argmax(1) == y[lab]).float().mean())}

        # --- the baseline: the same architecture, the same labelled images, cross-entropy only
        if "C" in modules:
            with ctx.autocast():
                l_c = modules["C"](x_in[lab]).float()
            c_loss = F.cross_entropy(l_c[:, :-1], y[lab])
            opts["C"].zero_grad(set_to_none=True)
            c_loss.backward()
            opts["C"].step()
            metrics["loss_baseline"] = float(c_loss.detach())

        # --- G: feature matching on D's last features (or non-saturating on the real-vs-fake logit)
        z = torch.randn(n, p.latent_dim, generator=gen).to(dev)
        with ctx.no_sync(D):
            with ctx.autocast():
                if p.g_loss == "feature-matching":
                    with torch.no_grad():
                        _, f_real = D(x_in, features=True)
                    _, f_fake = D(self.d_input(G(z), ctx), features=True)
                    g_loss = feature_matching_loss(f_real, f_fake)
                else:
                    g_loss = losses.g_loss("non-saturating", self.real_logit(D(self.d_input(G(z), ctx)).float()))
            opts["G"].zero_grad(set_to_none=True)
            g_loss.backward()
        opts["G"].step()
        metrics.update(loss_d=float(d_loss.detach()), loss_g=float(g_loss.detach()),
                       labelled_per_batch=float(lab.sum()))
        return metrics

    @torch.no_grad()
    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None) -> torch.Tensor:
        return ema["G"](z).float().clamp(-1, 1)  # labels are ignored: G is unconditional

    @torch.no_grad()
    def classify(self, ema, stage, images: torch.Tensor) -> torch.Tensor:
        return ema["D"](images).float()[:, :-1].softmax(dim=1)

    @torch.no_grad()
    def extra_scores(self, ema, stage, batches) -> dict[str, float]:
        right = {"D": 0, "C": 0}
        total = 0
        for b in batches():
            keep = b["label"] >= 0
            if not bool(keep.any()):
                continue
            x, y = b["image"][keep], b["label"][keep]
            for k in right:
                if k in ema:
                    right[k] += int((ema[k](x)[:, :-1].argmax(1) == y).sum())
            total += int(keep.sum())
        if not total:
            return {}
        out = {"accuracy": right["D"] / total}
        if "C" in ema:
            out["baseline_accuracy"] = right["C"] / total
            out["accuracy_gain"] = out["accuracy"] - out["baseline_accuracy"]
        return out
