"""What users see of a family besides its samples: the checkpoint grid, extra pictures in MLflow, the DVC plot's
column, notes on how a stage trains, and family-specific evaluation numbers. All optional."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ganforge.models.family.core import StageSpec


class Figures:
    score_directions: ClassVar[dict[str, str]] = {}  # extra score -> "lower" / "higher" is better

    def plot_key(self, stage: StageSpec) -> str:
        """The history column DVC plots for ``stage`` (x = kimg); every numeric column is in the CSV."""
        return "loss_g"

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
