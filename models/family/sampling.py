"""Sampling and truncation: seed -> latent -> image, in one place. Every generator needs this, and the
defaults fit most: N(0, I) latents of ``latent_dim`` from each sample's own seed, uniform class labels for a
conditional family. Override ``latent_for`` when the truncation trick changes how z is drawn (BigGAN),
``can_sample`` for a stage that only reconstructs (VQ-GAN's autoencoder), ``batch_labels`` never."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ganforge.models.family.core import Batch, StageSpec


class Sampling:
    latent_dim: int = 0
    num_classes: int = 0  # > 0: class-conditional; samples carry labels 0..num_classes-1
    supports_truncation: bool = False

    def latent(self, seed: int) -> torch.Tensor:
        """The latent of one sample: N(0, I) from its own seed (independent of batch and worker)."""
        return torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(int(seed)))

    def latent_for(self, seed: int, truncation: float | None = None) -> torch.Tensor:
        """The latent of one sample under ``truncation``: a family whose truncation trick changes how z is drawn
        (BigGAN's truncated normal) overrides this; by default, :meth:`latent`."""
        return self.latent(seed)

    def label_for(self, seed: int) -> int | None:
        """The class of the sample of ``seed`` when no label is given (uniform over classes, balanced)."""
        return int(seed) % self.num_classes if self.num_classes else None

    def batch_labels(self, batch: Batch) -> torch.Tensor | None:
        """The batch's labels for a class-conditional step (None when unconditional); every image must have one."""
        if not self.num_classes:
            return None
        y = batch["label"]
        if bool((y < 0).any()) or bool((y >= self.num_classes).any()):
            raise ValueError(f"conditional {self.name} needs every image labelled in [0, {self.num_classes}); "
                             f"got labels {sorted(set(y.tolist()))[:5]}")
        return y

    def can_sample(self, stage: StageSpec) -> bool:
        """Whether ``sample`` works with this stage's modules (an autoencoder stage only reconstructs)."""
        return True

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
