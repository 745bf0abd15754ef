"""CycleGAN (Zhu et al. 2017): unpaired image-to-image translation between two domains A and B.

As pytorch-CycleGAN-and-pix2pix trains it (``cycle_gan_model.py``):

- two ResNet generators, G: A -> B (``G_AB``) and F: B -> A (``G_BA``), and two 70x70 PatchGAN discriminators
  with instance norm, ``D_B`` (real B vs G(A)) and ``D_A`` (real A vs F(B)), the shared PatchGAN of
  ``models/nn/patchgan.py``;
- LSGAN losses; cycle consistency ||F(G(a)) - a||_1 + ||G(F(b)) - b||_1 weighted by lambda (10), and the
  identity loss ||G(b) - b||_1 + ||F(a) - a||_1 weighted by lambda_identity * lambda (0.5 * 10);
- the discriminators see a history pool of 50 earlier fakes per domain (Shrivastava et al. 2017): each new fake
  is stored while the pool fills; then, with p = 0.5, it replaces a random stored one and that stored image is
  shown instead. The pools are per worker and go into every checkpoint (each rank its own), so resume is exact;
- one Adam (lr 2e-4, betas (0.5, 0.999)) for both generators and one for both discriminators, at a constant
  lr for the first ``decay_start`` of the stage, then linearly down to 0 at its last step (the reference's
  linear policy, per step); the lr is a function of the step, and the schedule is in the checkpoint's family
  state;
- data: unpaired (A, B) batches from two-domain shards, each domain shuffled on its own, resized to
  ``load_size`` and randomly cropped to the resolution (286 -> 256 in the reference), optionally flipped.

There is no EMA in the reference; ``ema: true`` keeps one of both generators. The registered model translates
uint8 images in either direction (``direction``: AtoB or BtoA).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ganforge.models import losses
from ganforge.models.family import Betas, Section, SingleStageFamily, StageSpec, StepContext
from ganforge.models.nn.patchgan import PatchDiscriminator, patch_grid
from ganforge.models.nn.resnet import ResnetGenerator

# direction -> (source domain, target domain), and the generator that translates it
DIRECTIONS = {"AtoB": ("A", "B"), "BtoA": ("B", "A")}
GENERATOR = {"AtoB": "G_AB", "BtoA": "G_BA"}


class CycleGANParams(Section):
    """CycleGAN: two ResNet generators and two PatchGANs on unpaired two-domain data (the reference's defaults)."""

    kimg: float = Field(20.0, gt=0, description="thousands of (A, B) pairs shown")
    ngf: int = Field(64, ge=2, description="generator width: channels of the first and last convolution (64)")
    ndf: int = Field(64, ge=2, description="PatchGAN width (64)")
    n_blocks: int | None = Field(None, ge=0, description="residual blocks; null: 9 at 256px and above, 6 below "
                                                         "(the reference's resnet_9blocks / resnet_6blocks)")
    d_layers: int = Field(3, ge=1, description="PatchGAN layers (3: 70x70 patches); at most log2(resolution / 3)")
    norm: Literal["instance", "batch"] = Field("instance", description="normalisation of G and D")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the residual blocks (the reference: none)")
    lambda_cycle: float = Field(10.0, ge=0, description="weight of the cycle-consistency L1 (lambda)")
    lambda_identity: float = Field(0.5, ge=0, description="identity L1 weight, as a fraction of lambda_cycle")
    pool_size: int = Field(50, ge=0, description="history pool of generated images per discriminator; 0: none")
    lr: float = Field(2e-4, gt=0, description="Adam's learning rate, both networks")
    betas: Betas = Field((0.5, 0.999), description="Adam's betas")
    decay_start: float = Field(0.5, ge=0, lt=1, description="fraction of the stage after which lr decays "
                                                            "linearly to 0 at the last step")
    load_size: int | None = Field(None, ge=4, description="resize to this, then randomly crop train.resolution; "
                                                          "null: resolution * 286 / 256; = resolution: no crop")
    ema: bool = Field(False, description="keep an EMA of the generators for evaluation and export (the "
                                         "reference has none)")


class ImagePool:
    """The discriminator's history of generated images (pytorch-CycleGAN-and-pix2pix's ``ImagePool``), drawn
    from the step's generator so a resumed run makes the same choices."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """What D sees for a batch of new fakes: the fakes themselves while the pool fills; then each one with
        p = 0.5, or else a stored one that it replaces."""
        if self.size == 0:
            return images.detach()
        if self.images and self.images[0].device != images.device:  # restored on the CPU, training on a GPU
            self.images = [t.to(images.device) for t in self.images]
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif float(torch.rand((), generator=generator)) > 0.5:
                k = int(torch.randint(0, self.size, (), generator=generator))
                out.append(self.images[k])
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state(self) -> torch.Tensor:
        return torch.stack([t.cpu() for t in self.images]) if self.images else torch.zeros(0)

    def load(self, images: torch.Tensor | None) -> None:
        """Restore :meth:`state` (on the CPU; the next query moves the images to the fakes' device)."""
        self.images = [] if images is None or images.numel() == 0 else list(images)[: self.size]


def lr_factor(step: int, total_steps: int, decay_start: float) -> float:
    """The reference's "linear" policy, per step instead of per epoch: 1 for the first ``decay_start`` of the
    steps, then down linearly to exactly 0 at the last step (``total_steps - 1``; the reference's per-epoch rule
    ends one epoch short of 0). A one-step stage has no room to decay and keeps the full lr."""
    if total_steps <= 1:
        return 1.0
    start = min(int(round(decay_start * total_steps)), total_steps - 1)
    if step < start:
        return 1.0
    return max(0.0, (total_steps - 1 - step) / max(1, total_steps - 1 - start))


class CycleGAN(SingleStageFamily):
    name = "cyclegan"
    contract_overrides = {"ngf": 4, "ndf": 4, "n_blocks": 1,
                          "d_layers": 1}
    Params = CycleGANParams
    product = "translator"
    domains = ("A", "B")
    directions = DIRECTIONS
    ema_modules = ("G_AB", "G_BA")
    score_directions = {"cycle_l1": "lower", "cycle_l1_A": "lower", "cycle_l1_B": "lower"}

    def __init__(self, params):
        super().__init__(params)
        self.pools = {"A": ImagePool(self.p.pool_size), "B": ImagePool(self.p.pool_size)}
        self.last_lr_factor = 1.0

    # --- params
    @classmethod
    def check_params(cls, train, section: CycleGANParams) -> None:
        r = train.resolution
        if r < 8:
            raise ValueError(f"train.cyclegan needs train.resolution >= 8 (the generator works at resolution / 4 "
                             f"with instance norm), got {r}")
        norm_side, logits = patch_grid(r, section.d_layers)
        if logits < 1 or (section.norm == "instance" and norm_side < 2):
            top = max(1, int(math.log2(r / 3)))
            raise ValueError(f"train.cyclegan.d_layers ({section.d_layers}) leaves the PatchGAN no patches at "
                             f"train.resolution {r}px: use d_layers <= {top}")
        if section.norm == "batch" and train.workers > 1:
            # each step runs every network several times before one backward; DDP re-broadcasts BatchNorm's
            # running statistics in place before each of those forwards, which CUDA's backward refuses
            raise ValueError(f"train.cyclegan.norm: batch needs train.workers: 1 (got {train.workers}); the "
                             f"reference's instance norm trains on any number of workers")
        if section.load_size is not None and section.load_size < r:
            raise ValueError(f"train.cyclegan.load_size ({section.load_size}) must be >= train.resolution ({r}): "
                             f"images are resized to it, then cropped to the resolution")

    def check_data(self, manifest: dict, shards) -> None:
        super().check_data(manifest, shards)
        counts = {n: manifest["splits"].get(n, {}).get("count", 0) for n in ("testA", "testB")}
        if min(counts.values()) < 2:
            raise ValueError(f"cyclegan needs test images of both domains for its grids and evaluation, but the shards "
                             f"in {shards} have {counts}: shard with data.val_fraction > 0 (at least 2 per domain), "
                             f"or give the layout folder testA/ and testB/")

    def stage_info(self) -> dict:
        r = self.params.resolution
        return {"data": "two-domain", "load_size": self.p.load_size or int(round(r * 286 / 256))}

    def n_blocks(self) -> int:
        return self.p.n_blocks if self.p.n_blocks is not None else (9 if self.params.resolution >= 256 else 6)

    def notes(self, stage: StageSpec) -> dict[str, str]:
        p = self.p
        return {"data": f"unpaired (A, B) batches, resized to {stage.info['load_size']}px then randomly cropped to "
                        f"{stage.resolution}px" + (", flipped" if self.params.xflip else ""),
                "lr": f"{p.lr:g} constant for {p.decay_start:.0%} of the stage, then linearly to 0 at its last step",
                "generators": f"ResNet, ngf {p.ngf}, {self.n_blocks()} residual blocks"}

    # --- modules
    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        p = self.p
        g = lambda: ResnetGenerator(p.ngf, self.n_blocks(), p.norm, p.dropout)  # noqa: E731
        d = lambda: PatchDiscriminator(p.ndf, p.d_layers, p.norm)  # noqa: E731
        return {"G_AB": g(), "G_BA": g(), "D_A": d(), "D_B": d()}

    def optimizers(self, modules):
        p = self.p
        gen = [*modules["G_AB"].parameters(), *modules["G_BA"].parameters()]
        dis = [*modules["D_A"].parameters(), *modules["D_B"].parameters()]
        return {"G": torch.optim.Adam(gen, lr=p.lr, betas=p.betas), "D": torch.optim.Adam(dis, lr=p.lr, betas=p.betas)}

    def use_ema(self, stage: StageSpec) -> bool:
        return self.p.ema

    # --- state: the lr schedule (all ranks) and the pools (per rank)
    def total_steps(self, stage: StageSpec) -> int:
        """Optimizer steps of the stage, as the loop counts them (it stops at round(kimg * 1000) images)."""
        return max(1, math.ceil(round(stage.kimg * 1000) / self.params.batch_size))

    def state_dict(self) -> dict:
        st = self.stages()[0]
        return {"lr_schedule": {"policy": "linear", "lr": self.p.lr, "total_steps": self.total_steps(st),
                                "decay_start": self.p.decay_start, "factor": self.last_lr_factor}}

    def load_state_dict(self, state: dict) -> None:
        self.last_lr_factor = float((state.get("lr_schedule") or {}).get("factor", 1.0))

    def rank_state_dict(self) -> dict:
        return {f"pool_{d}": pool.state() for d, pool in self.pools.items()}

    def load_rank_state_dict(self, state: dict) -> None:
        for d, pool in self.pools.items():
            pool.load(state.get(f"pool_{d}"))

    # --- one step
    def discriminate(self, modules, stage, real, fake, labels=None):
        """D_B on real B images and translated ones, in two passes as the reference does (instance norm is per
        image, so the passes leak nothing)."""
        return modules["D_B"](real), modules["D_B"](fake)

    def train_step(self, modules, opts, batch, stage, ctx: StepContext) -> dict[str, float]:
        p = self.p
        G_AB, G_BA, D_A, D_B = (modules[k] for k in ("G_AB", "G_BA", "D_A", "D_B"))
        factor = lr_factor(ctx.step, self.total_steps(stage), p.decay_start)
        for o in opts.values():
            for group in o.param_groups:
                group["lr"] = p.lr * factor
        self.last_lr_factor = factor
        real_a, real_b = batch["image_a"], batch["image_b"]

        # --- generators, with both D's frozen as the reference does (no weight gradients computed for them; under
        # DDP no_sync keeps their reducers out of this backward)
        D_A.requires_grad_(False)
        D_B.requires_grad_(False)
        with ctx.no_sync(D_A), ctx.no_sync(D_B):
            with ctx.autocast():
                fake_b, fake_a = G_AB(real_a), G_BA(real_b)
                rec_a, rec_b = G_BA(fake_b), G_AB(fake_a)
                # G's LSGAN term is the reference's MSE to 1, i.e. twice our 0.5-scaled least-squares loss
                adv_ab = 2 * losses.g_loss("least-squares", D_B(self.d_input(fake_b, ctx)).float())
                adv_ba = 2 * losses.g_loss("least-squares", D_A(self.d_input(fake_a, ctx)).float())
                cyc_a = F.l1_loss(rec_a.float(), real_a)
                cyc_b = F.l1_loss(rec_b.float(), real_b)
                idt_a = idt_b = torch.zeros((), device=ctx.device)
                if p.lambda_identity > 0:
                    idt_a, idt_b = identity_losses(G_AB, G_BA, real_a, real_b)
            loss_g = (adv_ab + adv_ba + p.lambda_cycle * (cyc_a + cyc_b)
                      + p.lambda_cycle * p.lambda_identity * (idt_a + idt_b))
            opts["G"].zero_grad(set_to_none=True)
            loss_g.backward()
        opts["G"].step()
        D_A.requires_grad_(True)
        D_B.requires_grad_(True)

        # --- discriminators on real images and on the pools' fakes
        pool_b = self.pools["B"].query(fake_b.float(), ctx.generator)
        pool_a = self.pools["A"].query(fake_a.float(), ctx.generator)
        with ctx.autocast():
            d_b_real, d_b_fake = D_B(self.d_input(real_b, ctx)).float(), D_B(self.d_input(pool_b, ctx)).float()
            d_a_real, d_a_fake = D_A(self.d_input(real_a, ctx)).float(), D_A(self.d_input(pool_a, ctx)).float()
        loss_d_b = losses.d_loss("least-squares", d_b_real, d_b_fake)
        loss_d_a = losses.d_loss("least-squares", d_a_real, d_a_fake)
        opts["D"].zero_grad(set_to_none=True)
        (loss_d_a + loss_d_b).backward()
        opts["D"].step()
        return {"loss_g": float(loss_g.detach()), "loss_d": float((loss_d_a + loss_d_b).detach()),
                "loss_g_ab": float(adv_ab.detach()), "loss_g_ba": float(adv_ba.detach()),
                "loss_cycle": float((cyc_a + cyc_b).detach()), "loss_identity": float((idt_a + idt_b).detach()),
                "loss_d_a": float(loss_d_a.detach()), "loss_d_b": float(loss_d_b.detach()), "lr": p.lr * factor}

    def plot_key(self, stage: StageSpec) -> str:
        return "loss_cycle"

    # --- the product: translations
    def can_sample(self, stage: StageSpec) -> bool:
        return False

    def generate(self, ema, z, stage, labels=None, truncation=None, images_in_stage=None):
        raise ValueError("cyclegan translates images; it does not generate from latents (use translate)")

    @torch.no_grad()
    def translate(self, ema, stage, images, direction=None) -> torch.Tensor:
        return ema[GENERATOR[direction or "AtoB"]](images).float().clamp(-1, 1)

    def grid_columns(self, stage: StageSpec) -> int:
        return 6

    @torch.no_grad()
    def grid(self, ema, stage, seeds, real_fn, images_in_stage=None) -> torch.Tensor:
        """Per row, on fixed test images: A | G(A) | F(G(A)) | B | F(B) | G(F(B))."""
        def real(domain: str) -> torch.Tensor:
            try:
                return real_fn(f"test{domain}")[: self.params.grid_size]
            except StopIteration:  # no test split (val_fraction 0): train images
                return real_fn(f"train{domain}")[: self.params.grid_size]

        a, b = real("A"), real("B")
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        g_a, f_b = ema["G_AB"](a).float(), ema["G_BA"](b).float()
        cols = [a, g_a, ema["G_BA"](g_a).float(), b, f_b, ema["G_AB"](f_b).float()]
        return torch.stack(cols, 1).flatten(0, 1).clamp(-1, 1)

    # --- evaluation beside the FIDs: how well a round trip comes back
    @torch.no_grad()
    def extra_scores(self, ema, stage, batches) -> dict[str, float]:
        """Mean cycle-reconstruction L1 on the test splits, in [0, 1] intensity: |F(G(a)) - a| and |G(F(b)) - b|."""
        out = {}
        for d, there, back in (("A", "G_AB", "G_BA"), ("B", "G_BA", "G_AB")):
            total, n = 0.0, 0
            for b in batches(d):
                x = b["image"]
                total += float((ema[back](ema[there](x)).float().clamp(-1, 1) - x).abs().mean((1, 2, 3)).sum()) / 2
                n += len(x)
            if n:
                out[f"cycle_l1_{d}"] = total / n
        if len(out) == 2:
            out["cycle_l1"] = (out["cycle_l1_A"] + out["cycle_l1_B"]) / 2
        return out


def identity_losses(G_AB: nn.Module, G_BA: nn.Module, real_a: torch.Tensor,
                    real_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity terms (Taigman et al. 2017, CycleGAN sec. 5.2): a generator given an image of its own target
    domain should leave it alone, ||G(b) - b||_1 and ||F(a) - a||_1; (the term of F, the term of G)."""
    return F.l1_loss(G_BA(real_a).float(), real_a), F.l1_loss(G_AB(real_b).float(), real_b)


__all__ = ["CycleGAN", "CycleGANParams", "ImagePool", "lr_factor", "identity_losses", "DIRECTIONS"]
