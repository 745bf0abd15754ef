"""The core contract: what every family defines. A family that implements this module's five abstract
methods (``stages``, ``build``, ``optimizers``, ``train_step``, ``generate``), names itself and declares its
``Params`` section trains, checkpoints, resumes, samples and is evaluated by the shared code; everything in
the sibling modules is optional and has a working default."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ganforge.models.family.params import Section

Batch = Mapping[str, torch.Tensor]  # "image" [-1,1] NCHW, "label" (-1: unlabelled); a token stream: "tokens"


@dataclass(frozen=True)
class StageSpec:
    name: str  # unique, sortable, no dots: e.g. "progan-r016"
    index: int
    resolution: int  # resolution of the real images this stage reads
    kimg: float  # thousands of real images shown in this stage
    info: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. transition_kimg)
    # "train": one Ray Train job of the shared loop. "prepare": the previous stage's EMA modules encode every shard
    # into new shards in RUN_DIR/<info["output"]> (family.prepare_encode; tasks/prepare.py), which a later train
    # stage with info["prepared"] == that folder reads through its data_stream (VQ-GAN's tokens).
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


class FamilyCore(ABC):
    """Name, params section, stages, modules, optimizers, one training step and the generator's forward."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Section]] = Section  # this family's params section: train.<name>
    ema_modules: tuple[str, ...] = ("G",)  # modules whose EMA copy is kept (samples + evaluation)

    def __init__(self, params: Any):
        """``params``: the validated ``train`` section (its ``<name>`` field is this family's section)."""
        from ganforge.models.augment import make_augmenter

        self.params = params
        self.p = getattr(params, self.name)
        self.augmenter = make_augmenter(params)

    @classmethod
    def check_params(cls, train: Any, section: Section) -> None:
        """Cross-checks between the train section and this family's section; raise ValueError to refuse."""

    @abstractmethod
    def stages(self) -> list[StageSpec]:
        """The stages in order; each is one job (see :class:`StageSpec`)."""

    @abstractmethod
    def build(self, stage: StageSpec) -> dict[str, nn.Module]:
        """Fresh modules of ``stage`` by name ("G", "D", ...), on the CPU, seeded by the loop."""

    @abstractmethod
    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...

    @abstractmethod
    def train_step(self, modules: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], batch: Batch,
                   stage: StageSpec, ctx: StepContext) -> dict[str, float]:
        """One update of every module from ``batch``; all randomness from ``ctx.generator``; returns metrics."""

    @abstractmethod
    def generate(self, ema: dict[str, nn.Module], z: torch.Tensor, stage: StageSpec, labels: torch.Tensor | None = None,
                 truncation: float | None = None, images_in_stage: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] from latents (and labels), with the EMA modules at the end of ``stage``."""
