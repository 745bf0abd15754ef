"""Adversarial losses as plain functions of discriminator logits, one name per loss.

``d_loss(kind, real, fake)`` and ``g_loss(kind, fake)`` for:

- ``minimax``: the original saturating game, D maximises log D(x) + log(1 - D(G(z))), G minimises log(1 - D(G(z)));
- ``non-saturating``: the same D, G maximises log D(G(z)) (Goodfellow et al. 2014, sec. 3);
- ``wasserstein``: the critic's E[D(fake)] - E[D(real)] (Arjovsky et al. 2017); pair it with a Lipschitz
  constraint (clipping or :func:`ganforge.models.regularizers.gradient_penalty`);
- ``hinge``: E[relu(1 - D(real))] + E[relu(1 + D(fake))], G: -E[D(fake)] (Lim & Ye 2017; SAGAN, BigGAN);
- ``least-squares``: LSGAN's a=0, b=c=1 (Mao et al. 2017): 0.5 E[(D(real) - 1)^2] + 0.5 E[D(fake)^2].

Logits are raw (no sigmoid); every loss is a mean over the batch (and patches). ``real_target`` < 1 is one-sided
label smoothing (Salimans et al. 2016): D's target for real images (minimax, non-saturating, least-squares only).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _d_minimax(real: Tensor, fake: Tensor, t: float = 1.0) -> Tensor:
    # binary cross-entropy with target t for real images: t*softplus(-r) + (1-t)*softplus(r)
    real_term = F.softplus(-real).mean() if t == 1.0 else (t * F.softplus(-real) + (1 - t) * F.softplus(real)).mean()
    return real_term + F.softplus(fake).mean()


def _g_minimax(fake: Tensor) -> Tensor:
    return -F.softplus(fake).mean()  # minimise log(1 - sigmoid(fake)) = -softplus(fake)


def _g_non_saturating(fake: Tensor) -> Tensor:
    return F.softplus(-fake).mean()


def _d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def _g_wasserstein(fake: Tensor) -> Tensor:
    return -fake.mean()


def _d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def _d_least_squares(real: Tensor, fake: Tensor, t: float = 1.0) -> Tensor:
    return 0.5 * (real - t).pow(2).mean() + 0.5 * fake.pow(2).mean()


def _g_least_squares(fake: Tensor) -> Tensor:
    return 0.5 * (fake - 1.0).pow(2).mean()


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "minimax": _d_minimax, "non-saturating": _d_minimax, "wasserstein": _d_wasserstein, "hinge": _d_hinge,
    "least-squares": _d_least_squares,
}
G_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "minimax": _g_minimax, "non-saturating": _g_non_saturating, "wasserstein": _g_wasserstein,
    "hinge": _g_wasserstein, "least-squares": _g_least_squares,
}
ADVERSARIAL_LOSSES = tuple(D_LOSSES)
SMOOTHABLE = ("minimax", "non-saturating", "least-squares")  # losses with a target for real images


def d_loss(kind: str, real: Tensor, fake: Tensor, real_target: float = 1.0) -> Tensor:
    """The discriminator's (critic's) loss on logits of real and generated images; ``real_target`` < 1 smooths
    the real labels (one-sided)."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; allowed: {', '.join(D_LOSSES)}")
    if real_target == 1.0:
        return D_LOSSES[kind](real, fake)
    if kind not in SMOOTHABLE:
        raise ValueError(f"label smoothing needs a loss with targets ({', '.join(SMOOTHABLE)}), not {kind!r}")
    return D_LOSSES[kind](real, fake, real_target)


def g_loss(kind: str, fake: Tensor) -> Tensor:
    """The generator's loss on the discriminator's logits of generated images."""
    if kind not in G_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; allowed: {', '.join(G_LOSSES)}")
    return G_LOSSES[kind](fake)
