"""The discriminator's side: what D sees (``train.augment``), the adaptive augmentation's feedback, and how a D
step scores a real and a fake batch. Needed by a family with a discriminator; ``adaptive_augment`` opts it in to
ADA and Diffusion-GAN.

:meth:`discriminate` is how the family's own D step scores the two batches, and the contract test drives it:
a discriminator must not tell real from fake by *which pass* an image was in. A D with batch statistics
(BatchNorm in train mode) fed real and fake images in two separate passes does exactly that (the fidelity
review's finding 1); scoring both in one concatenated pass, as :func:`score_together` does, removes it."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from ganforge.models.family.core import StageSpec, StepContext


def score_together(D: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                   real_labels: torch.Tensor | None = None, fake_labels: torch.Tensor | None = None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """D's outputs on ``real`` and on ``fake`` from one forward pass over both (with their labels, for a
    conditional D): batch statistics then see one mixed batch, as every image of it does."""
    n = real.shape[0]
    if real_labels is None:
        out = D(torch.cat([real, fake]), **kwargs)
    else:
        out = D(torch.cat([real, fake]), torch.cat([real_labels, fake_labels]), **kwargs)
    return out[:n], out[n:]


class Discriminating:
    # whether train.augment may be ada / diffusion: the family feeds D's outputs on real images back
    # (:meth:`d_feedback`) and builds its discriminators with :attr:`d_in_channels` input channels
    adaptive_augment: ClassVar[bool] = False

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

    def discriminate(self, modules: dict[str, nn.Module], stage: StageSpec, real: torch.Tensor, fake: torch.Tensor,
                     labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """D's real/fake logits ([N, ...], higher = more real) for a batch of real and a batch of fake images,
        computed the way this family's D step computes them (its own D, in train mode, with the same passes).
        None: the family has no discriminator that scores images (a VAE, a plain translator)."""
        return None
