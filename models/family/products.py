"""Products: what the registry registers and evaluation scores. A generator (seeds -> images) needs nothing
here. A translator (images -> images: CycleGAN, with ``domains`` and ``directions`` when unpaired) implements
:meth:`translate`; a classifier (images -> class probabilities: SGAN's D) implements :meth:`classify` and
gates on accuracy; an autoencoder stage implements :meth:`reconstruct` (evaluation then adds rFID)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ganforge.models.family.core import StageSpec

PRODUCTS = ("generator", "translator", "classifier")


class Products:
    product: ClassVar[str] = "generator"  # one of PRODUCTS
    # an unpaired translator's image domains and its directions, each (source domain, target domain) (CycleGAN:
    # ("A", "B"); AtoB, BtoA; the first is the default): it trains on two-domain shards (trainA/trainB), which
    # every other family refuses
    domains: ClassVar[tuple[str, ...]] = ()
    directions: ClassVar[dict[str, tuple[str, str]]] = {}
    # the evaluation number the promotion gate compares unless registry.gate_metric says otherwise, and which
    # way it improves: FID for generators; a classifier's accuracy
    gate: ClassVar[tuple[str, str]] = ("fid", "lower")

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

    def can_reconstruct(self, stage: StageSpec) -> bool:
        """Whether ``reconstruct`` works (autoencoders): evaluation then adds reconstruction FID (rfid)."""
        return False

    def reconstruct(self, ema: dict[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Reconstructions in [-1, 1] of model inputs ``x``."""
        raise NotImplementedError(f"family {self.name} does not reconstruct")
