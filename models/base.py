"""The interface every GAN family implements; the shared training loop only sees this.

A family declares its stages and, per stage, builds its modules, optimizers and
one training step. Checkpointing, EMA, data, distribution, logging and sample
grids live in the shared loop (tasks/loop.py) and do not know which family runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ganforge.tasks.params import TrainParams


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


class GANFamily(ABC):
    name: str = ""
    ema_modules: tuple[str, ...] = ("G",)  # modules whose EMA copy is kept (samples + evaluation)
    latent_dim: int = 0

    def __init__(self, params: TrainParams):
        self.params = params

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

    @abstractmethod
    def train_step(
        self, modules: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], real: torch.Tensor,
        labels: torch.Tensor, stage: StageSpec, ctx: StepContext,
    ) -> dict[str, float]: ...

    @abstractmethod
    def generate(self, ema: dict[str, nn.Module], z: torch.Tensor, stage: StageSpec, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] from latents, with the EMA modules at the end of ``stage``."""

    def can_sample(self, stage: StageSpec) -> bool:
        """Whether ``generate`` works with this stage's modules (an autoencoder stage only reconstructs)."""
        return True

    def ema_names(self, stage: StageSpec) -> tuple[str, ...]:
        """Modules whose EMA copy the loop keeps in ``stage`` (used for samples, evaluation, export)."""
        return self.ema_modules

    def use_ema(self, stage: StageSpec) -> bool:
        """False: the 'EMA' copies just follow the trained weights."""
        return True

    def notes(self, stage: StageSpec) -> dict[str, str]:
        """Facts about how ``stage`` trains that users must see (logged, and tagged on the MLflow run)."""
        return {}

    def grid(self, ema: dict[str, nn.Module], stage: StageSpec, z: torch.Tensor, real_fn: Callable[[], torch.Tensor],
             images_in_stage: int | None = None) -> torch.Tensor:
        """The checkpoint's sample grid; ``real_fn()`` gives fixed real images (for reconstructions)."""
        return self.generate(ema, z, stage, images_in_stage=images_in_stage)


def get_family(params: TrainParams) -> GANFamily:
    from ganforge.models.progan import ProGAN
    from ganforge.models.vqgan import VQGAN

    families = {"progan": ProGAN, "vqgan": VQGAN}
    if params.family not in families:
        raise ValueError(f"unknown family {params.family!r}; allowed: {', '.join(families)}")
    return families[params.family](params)
