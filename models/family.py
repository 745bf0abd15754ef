"""The interface every GAN family implements, and the registry that finds families by name.

A family declares its params section (a pydantic model, ``Params``), its stages
and, per stage, builds its modules, optimizers and one training step. The Ray
Train loop, checkpointing, EMA, data, logging, evaluation and the registry live
in ``ganforge.tasks`` and do not know which family runs.

Families register themselves (``ganforge.models.families``: the registry): every
built-in module there is scanned for :class:`GANFamily` subclasses with a ``name``,
and every entry point of the ``ganforge.families`` group
(``name = "package.module:Class"``) adds one from a user's own package, with no
edit to ganforge.

This module is the bottom of the family layer: it imports nothing from
``ganforge.tasks`` or ``ganforge.flows``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Mapping, Sequence

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict
from torch import nn

log = logging.getLogger("ganforge.family")

Batch = Mapping[str, torch.Tensor]  # "image" [-1,1] NCHW, "label" (-1: unlabelled); token stages: "tokens"


# ----------------------------------------------------------------------------- params sections


class Section(BaseModel):
    """A params section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError(f"both betas must be in [0, 1), got {v}")
    return v


def _check_pow2(v: int) -> int:
    if not is_pow2(v):
        raise ValueError(f"must be a power of two (4, 8, 16, 32, ...), got {v}")
    return v


Betas = Annotated[tuple[float, float], AfterValidator(_check_betas)]  # Adam's (beta1, beta2)
Pow2 = Annotated[int, AfterValidator(_check_pow2)]


# ----------------------------------------------------------------------------- stages and steps


@dataclass(frozen=True)
class StageSpec:
    name: str  # unique, sortable, no dots: e.g. "progan-r016"
    index: int
    resolution: int  # resolution of the real images this stage reads
    kimg: float  # thousands of real images shown in this stage
    info: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. transition_kimg)
    # "train": one Ray Train job of the shared loop; "tokens": encodes the data for the next stage
    # (tasks/tokens.py). A train stage whose info["data"] == "tokens" reads that stage's shards.
    kind: str = "train"


@dataclass
class StepContext:
    """What a family's train_step may use besides its modules and the batch."""

    step: int  # optimizer steps taken in this stage before this one
    images_in_stage: int  # real images shown in this stage before this batch (global, all ranks)
    generator: torch.Generator  # all randomness of the step comes from here (resume-exact)
    device: torch.device
    autocast: Callable[[], AbstractContextManager]  # mixed precision context (no-op on CPU)
    no_sync: Callable[[nn.Module], AbstractContextManager]  # skip DDP gradient sync for a module
    # a fresh batch from the same stream (n_critic / several D steps per G step); resume-exact
    next_batch: Callable[[], Batch] = lambda: (_ for _ in ()).throw(RuntimeError("no stream"))  # noqa: E731


class GANFamily(ABC):
    """One family of generative models. Subclasses set ``name`` and ``Params`` and implement the rest."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Section]] = Section  # this family's params section: train.<name>
    ema_modules: tuple[str, ...] = ("G",)  # modules whose EMA copy is kept (samples + evaluation)
    latent_dim: int = 0
    num_classes: int = 0  # > 0: class-conditional; samples carry labels 0..num_classes-1
    supports_truncation: bool = False
    # what the registry registers: "generator" (seeds -> images), "translator" (images -> images, e.g. CycleGAN)
    # or "classifier" (images -> class probabilities, e.g. the semi-supervised GAN's discriminator)
    product: ClassVar[str] = "generator"
    # an unpaired translator's image domains and its directions, each (source domain, target domain) (CycleGAN:
    # ("A", "B"); AtoB, BtoA; the first is the default): it trains on two-domain shards (trainA/trainB), which
    # every other family refuses
    domains: ClassVar[tuple[str, ...]] = ()
    directions: ClassVar[dict[str, tuple[str, str]]] = {}
    # the evaluation number the promotion gate compares unless registry.gate_metric says otherwise, and which
    # way it improves: FID for generators; a classifier's accuracy
    gate: ClassVar[tuple[str, str]] = ("fid", "lower")
    # whether train.augment may be ada / diffusion: the family feeds D's outputs on real images back
    # (:meth:`d_feedback`) and builds its discriminators with :attr:`d_in_channels` input channels
    adaptive_augment: ClassVar[bool] = False

    def __init__(self, params: Any):
        """``params``: the validated ``train`` section (its ``<name>`` field is this family's section)."""
        from ganforge.models.augment import make_augmenter

        self.params = params
        self.p = getattr(params, self.name)
        self.augmenter = make_augmenter(params)

    # --- params
    @classmethod
    def check_params(cls, train: Any, section: Section) -> None:
        """Cross-checks between the train section and this family's section; raise ValueError to refuse."""

    def check_data(self, manifest: dict, shards: Any) -> None:
        """Refuse shards this family cannot train on (ValueError, one line), before any worker starts. By default:
        a class-conditional family needs shards with exactly its number of classes; two-domain shards are for a
        family with ``domains``, and it needs them."""
        two = manifest.get("kind") == "two-domain"
        if two and not self.domains:
            raise ValueError(f"the shards in {shards} hold two unpaired domains (trainA/trainB): family {self.name} "
                             f"trains on one; shard a single source for it, or train an unpaired translator "
                             f"(train.family: cyclegan)")
        if self.domains and not two:
            raise ValueError(f"family {self.name} translates between two unpaired domains but the shards in {shards} "
                             f"hold one: shard with `ganforge shard --source A --source-b B`, or a folder with "
                             f"trainA/ trainB/ testA/ testB/")
        if not self.num_classes:
            return
        classes = manifest.get("classes") or []
        if not classes:
            raise ValueError(f"family {self.name} is class-conditional ({self.num_classes} classes) but the shards in "
                             f"{shards} have no labels: shard a labelled source (class subfolders, digits) or train "
                             f"it unconditionally")
        if len(classes) != self.num_classes:
            raise ValueError(f"family {self.name} is set for {self.num_classes} classes but the shards in {shards} "
                             f"have {len(classes)} ({', '.join(map(str, classes[:5]))}, ...): set "
                             f"the train.{self.name} section's class count to {len(classes)}")

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        """Keys of this section that ``--kimg-per-stage K`` sets (thousands of images per stage)."""
        return {}

    # --- stages and modules
    @abstractmethod
    def stages(self) -> list[StageSpec]: ...

    @abstractmethod
    def build(self, stage: StageSpec) -> dict[str, nn.Module]: ...

    @abstractmethod
    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...

    def grow(self, modules: dict[str, nn.Module], previous: dict[str, dict[str, torch.Tensor]]) -> None:
        """Start a stage from the previous stage's weights (new parts keep their init)."""
        for name, sd in previous.items():
            if name in modules:
                missing, unexpected = modules[name].load_state_dict(sd, strict=False)
                if unexpected:
                    raise ValueError(f"{name}: previous stage has weights this stage lacks: {unexpected[:5]}")

    # --- state outside the modules (path-length mean, ADA p, image pools, schedulers), checkpointed
    def state_dict(self) -> dict[str, Any]:
        """Family state that is not in a module or optimizer; saved in every checkpoint (tensors, numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: on resume, and when a stage starts from the previous stage's
        checkpoint (override to reset what must not carry over)."""

    def rank_state_dict(self) -> dict[str, Any]:
        """State that differs per worker (CycleGAN's image pools of this rank's own fakes): every rank saves its
        own beside its RNG state, and gets it back on resume (not when a stage starts from another stage)."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state_dict` returned on this rank (empty when the checkpoint has none for it)."""

    @abstractmethod
    def train_step(self, modules: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], batch: Batch,
                   stage: StageSpec, ctx: StepContext) -> dict[str, float]: ...

    # --- sampling: one contract, seed -> latent in one place
    def latent(self, seed: int) -> torch.Tensor:
        """The latent of one sample: N(0, I) from its own seed (independent of batch and worker)."""
        return torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(int(seed)))

    def latent_for(self, seed: int, truncation: float | None = None) -> torch.Tensor:
        """The latent of one sample under ``truncation``: a family whose truncation trick changes how z is drawn
        (BigGAN's truncated normal) overrides this; by default, :meth:`latent`."""
        return self.latent(seed)

    def batch_labels(self, batch: Batch) -> torch.Tensor | None:
        """The batch's labels for a class-conditional step (None when unconditional); every image must have one."""
        if not self.num_classes:
            return None
        y = batch["label"]
        if bool((y < 0).any()) or bool((y >= self.num_classes).any()):
            raise ValueError(f"conditional {self.name} needs every image labelled in [0, {self.num_classes}); "
                             f"got labels {sorted(set(y.tolist()))[:5]}")
        return y

    def d_input(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """What a discriminator sees of ``x`` (real or generated): ``train.augment``'s policy (DiffAugment, ADA at
        its current p, Diffusion-GAN's x_t with t as :attr:`d_in_channels` - 3 extra channels) with fresh
        randomness from the step's generator; the images themselves when it is ``none``."""
        return self.augmenter(x, ctx.generator)

    @property
    def d_in_channels(self) -> int:
        """Input channels of a discriminator: 3, plus what the augmentation adds (Diffusion-GAN's t)."""
        return 3 + self.augmenter.extra_channels

    def d_feedback(self, real_logits: torch.Tensor) -> None:
        """D's outputs on the real images of a discriminator step, positive meaning 'real': the overfitting
        signal E[sign(D(real))] that ADA's p and Diffusion-GAN's T follow (a no-op for the other policies)."""
        self.augmenter.feedback(real_logits)

    def checkpoint_state(self) -> dict[str, Any]:
        """:meth:`state_dict` plus the augmentation's (ADA's p, Diffusion-GAN's T): what a checkpoint stores."""
        state = dict(self.state_dict())
        aug = self.augmenter.state_dict()
        if aug:
            state["augment"] = aug
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned (resume, and a stage started from the previous one)."""
        self.load_state_dict(state)
        self.augmenter.load_state_dict(state.get("augment") or {})

    def ema_half_life(self, stage: StageSpec, images_in_stage: int, half_life_images: float) -> float:
        """The EMA half-life, in images, at this point of the stage (StyleGAN2 ramps it up from 0)."""
        return half_life_images

    def ema_start(self, stage: StageSpec) -> int:
        """Real images into ``stage`` before which the EMA copies just follow the trained weights (BigGAN)."""
        return 0

    def label_for(self, seed: int) -> int | None:
        """The class of the sample of ``seed`` when no label is given (uniform over classes, balanced)."""
        return int(seed) % self.num_classes if self.num_classes else None

    def sample(self, ema: dict[str, nn.Module], stage: StageSpec, seeds: Sequence[int],
               labels: Sequence[int] | None = None, truncation: float | None = None,
               images_in_stage: int | None = None) -> torch.Tensor:
        """Images in [-1, 1], one per seed: the contract the grids, the evaluation and the pyfunc all use."""
        if truncation is not None and truncation != 1.0 and not self.supports_truncation:
            raise ValueError(f"family {self.name} has no truncation trick (got truncation={truncation})")
        dev = next((p.device for m in ema.values() for p in m.parameters()), torch.device("cpu"))
        z = torch.stack([self.latent_for(s, truncation) for s in seeds]).to(dev)
        lab = None
        if self.num_classes:
            raw = list(labels) if labels is not None else [self.label_for(s) for s in seeds]
            bad = [v for v in raw if not 0 <= int(v) < self.num_classes]
            if bad:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got {bad[:5]}")
            lab = torch.tensor([int(v) for v in raw], dtype=torch.long, device=dev)
        return self.generate(ema, z, stage, labels=lab, truncation=truncation, images_in_stage=images_in_stage)

    @abstractmethod
    def generate(self, ema: dict[str, nn.Module], z: torch.Tensor, stage: StageSpec, labels: torch.Tensor | None = None,
                 truncation: float | None = None, images_in_stage: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] from latents (and labels), with the EMA modules at the end of ``stage``."""

    def can_sample(self, stage: StageSpec) -> bool:
        """Whether ``sample`` works with this stage's modules (an autoencoder stage only reconstructs)."""
        return True

    def plot_key(self, stage: StageSpec) -> str:
        """The history column DVC plots for ``stage`` (x = kimg); every numeric column is in the CSV."""
        return "loss_g"

    def can_reconstruct(self, stage: StageSpec) -> bool:
        """Whether ``reconstruct`` works (autoencoders): evaluation then adds reconstruction FID (rfid)."""
        return False

    def reconstruct(self, ema: dict[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Reconstructions in [-1, 1] of model inputs ``x``."""
        raise NotImplementedError(f"family {self.name} does not reconstruct")

    def ema_names(self, stage: StageSpec) -> tuple[str, ...]:
        """Modules whose EMA copy the loop keeps in ``stage`` (used for samples, evaluation, export)."""
        return self.ema_modules

    def use_ema(self, stage: StageSpec) -> bool:
        """False: the 'EMA' copies just follow the trained weights."""
        return True

    def notes(self, stage: StageSpec) -> dict[str, str]:
        """Facts about how ``stage`` trains that users must see (logged, and tagged on the MLflow run)."""
        return {}

    def grid(self, ema: dict[str, nn.Module], stage: StageSpec, seeds: Sequence[int],
             real_fn: Callable[..., torch.Tensor], images_in_stage: int | None = None) -> torch.Tensor:
        """The checkpoint's sample grid (grid_size x grid_size): one row per class for conditional families;
        ``real_fn()`` gives fixed real images (for reconstructions; shown as they are by a family that cannot
        sample, such as a classifier); ``real_fn(split)`` reads another split (two-domain shards: "testA", ...)."""
        if not self.can_sample(stage):
            return real_fn() if self.product != "translator" else self.translate_images(ema, stage, real_fn())
        labels = None
        if self.num_classes:
            n = self.params.grid_size
            labels = [(i // n) % self.num_classes for i in range(len(seeds))]
        return self.sample(ema, stage, seeds, labels=labels, images_in_stage=images_in_stage)

    def grid_columns(self, stage: StageSpec) -> int:
        """Images per row of the checkpoint grid (CycleGAN: the six of A | G(A) | F(G(A)) | B | F(B) | G(F(B)))."""
        return self.params.grid_size

    def figures(self, ema: dict[str, nn.Module], stage: StageSpec, seeds: Sequence[int]) -> dict[str, tuple[torch.Tensor, int]]:
        """Pictures beside the sample grid, logged to MLflow when training ends (StyleGAN's style mixing,
        truncation sweep and interpolation): name -> (images in [-1, 1], images per row)."""
        return {}

    def extra_scores(self, ema: dict[str, nn.Module], stage: StageSpec, batches: Callable[[], Any]) -> dict[str, float]:
        """Family-specific evaluation numbers (codebook usage, a classifier's accuracy, ...); ``batches()``
        iterates the reference split as mappings {"image": float NCHW in [-1, 1] at the stage's resolution,
        "label": int64 (-1: unlabelled)}. Declare each number's direction in ``score_directions``."""
        return {}

    score_directions: ClassVar[dict[str, str]] = {}  # extra score -> "lower" / "higher" is better

    # --- the other products
    def translate(self, ema: dict[str, nn.Module], stage: StageSpec, images: torch.Tensor,
                  direction: str | None = None) -> torch.Tensor:
        """product == "translator": images in [-1, 1] (NCHW) -> translated images in [-1, 1]; ``direction`` is
        one of ``directions`` for a two-domain translator (None: the first)."""
        raise NotImplementedError(f"family {self.name} does not translate images")

    def translate_images(self, ema: dict[str, nn.Module], stage: StageSpec, images: torch.Tensor,
                         direction: str | None = None) -> torch.Tensor:
        """:meth:`translate` with ``direction`` checked against ``directions``: what evaluation, the grids, the
        registered model and ``ganforge translate`` call."""
        if not self.directions:
            if direction is not None:
                raise ValueError(f"family {self.name} translates one way and takes no direction (got {direction!r})")
            return self.translate(ema, stage, images)
        if direction is None:
            direction = next(iter(self.directions))
        if direction not in self.directions:
            raise ValueError(f"direction must be one of {', '.join(self.directions)}, got {direction!r}")
        return self.translate(ema, stage, images, direction)

    def classify(self, ema: dict[str, nn.Module], stage: StageSpec, images: torch.Tensor) -> torch.Tensor:
        """product == "classifier": images in [-1, 1] (NCHW) -> class probabilities [N, num_classes]."""
        raise NotImplementedError(f"family {self.name} does not classify images")


class SingleStageFamily(GANFamily):
    """A family trained as one stage at train.resolution for its section's ``kimg`` (DCGAN, SGAN, SAGAN,
    BigGAN): ``--kimg-per-stage K`` sets that ``kimg``; ``stage_info`` is what the stage carries."""

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        return {"kimg": kimg}

    def stage_info(self) -> dict:
        return {}

    def stages(self) -> list[StageSpec]:
        r = self.params.resolution
        return [StageSpec(f"{self.name}-r{r:04d}", 0, r, self.p.kimg, info=self.stage_info())]
