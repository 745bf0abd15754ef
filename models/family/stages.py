"""Between and across stages: starting a stage from the previous one (growth), ``--kimg-per-stage``, and the
EMA schedule the loop applies. The defaults grow by loading matching weights and keep a plain EMA of
``ema_modules``; ProGAN grows new layers, StyleGAN2 ramps its EMA, BigGAN starts its EMA late, VQ-GAN swaps
modules between stages. :class:`SingleStageFamily` is the one-stage plan of most GANs."""

from __future__ import annotations

import torch
from torch import nn

from ganforge.models.family.core import StageSpec


class Stages:
    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        """Keys of this section that ``--kimg-per-stage K`` sets (thousands of images per stage)."""
        return {}

    def grow(self, modules: dict[str, nn.Module], previous: dict[str, dict[str, torch.Tensor]]) -> None:
        """Start a stage from the previous stage's weights (new parts keep their init)."""
        for name, sd in previous.items():
            if name in modules:
                missing, unexpected = modules[name].load_state_dict(sd, strict=False)
                if unexpected:
                    raise ValueError(f"{name}: previous stage has weights this stage lacks: {unexpected[:5]}")

    def ema_names(self, stage: StageSpec) -> tuple[str, ...]:
        """Modules whose EMA copy the loop keeps in ``stage`` (used for samples, evaluation, export)."""
        return self.ema_modules

    def use_ema(self, stage: StageSpec) -> bool:
        """False: the 'EMA' copies just follow the trained weights."""
        return True

    def ema_half_life(self, stage: StageSpec, images_in_stage: int, half_life_images: float) -> float:
        """The EMA half-life, in images, at this point of the stage (StyleGAN2 ramps it up from 0)."""
        return half_life_images

    def ema_start(self, stage: StageSpec) -> int:
        """Real images into ``stage`` before which the EMA copies just follow the trained weights (BigGAN)."""
        return 0
