"""Regularizers shared by families, as plain functions.

- :func:`gradient_penalty`: WGAN-GP's (||grad D(x_hat)|| - 1)^2 on real/fake interpolates (Gulrajani et al. 2017);
- :func:`r1_penalty`: ||grad D(x_real)||^2 (Mescheder et al. 2018); callers weight it by gamma/2;
- :func:`drift_penalty`: ProGAN's epsilon-drift E[D(real)^2];
- :func:`path_length_penalty`: StyleGAN2's path length regularizer with its running mean;
- :func:`orthogonal_penalty`: BigGAN's off-diagonal orthogonal regularization of weight matrices.

Lazy regularization (apply every k minibatches with the penalty scaled by k) is the caller's schedule.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Tensor = torch.Tensor


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor,
                     autocast: Callable | None = None) -> Tensor:
    """Mean (||grad critic(x_hat)||_2 - 1)^2 with x_hat = lerp(real, fake, eps); ``eps`` is [N,1,1,1] in [0,1)."""
    x_hat = torch.lerp(real.detach(), fake.detach(), eps).requires_grad_(True)
    if autocast is not None:
        with autocast():
            out = critic(x_hat).float()
    else:
        out = critic(x_hat).float()
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def r1_penalty(real_out: Tensor, real: Tensor) -> Tensor:
    """Mean ||grad D(real)||^2; ``real`` must require grad and ``real_out`` be D's output on it."""
    (grad,) = torch.autograd.grad(real_out.sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def drift_penalty(real_out: Tensor) -> Tensor:
    return real_out.pow(2).mean()


def path_length_penalty(images: Tensor, w: Tensor, mean: Tensor, decay: float = 0.01,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """StyleGAN2's (||J_w^T y|| - a)^2 with y ~ N(0, I)/sqrt(H W) and a the running mean of the lengths.

    ``w`` must be part of the graph that made ``images``; returns (penalty, updated running mean). The running
    mean is family state (checkpointed by the family) and, under DDP, updated from the mean length over all
    ranks, so every rank holds the same value."""
    n, _, h, wd = images.shape
    y = torch.randn(images.shape, generator=generator).to(images.device) / (h * wd) ** 0.5
    (grad,) = torch.autograd.grad((images * y).sum(), w, create_graph=True)
    lengths = grad.pow(2).sum(-1).mean(-1).sqrt() if grad.ndim == 3 else grad.pow(2).sum(-1).sqrt()
    batch_mean = lengths.mean().detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank keeps the same running mean (the checkpoint holds rank 0's, and resume must be exact)
        batch_mean = batch_mean.clone()
        torch.distributed.all_reduce(batch_mean)
        batch_mean /= torch.distributed.get_world_size()
    new_mean = mean.detach() + decay * (batch_mean - mean.detach())
    return (lengths - new_mean).pow(2).mean(), new_mean


def orthogonal_penalty(modules: Iterable[nn.Module] | nn.Module, beta: float = 1e-4,
                       skip: Callable[[str, Tensor], bool] | None = None) -> Tensor:
    """BigGAN's beta * sum ||W W^T * (1 - I)||_F^2 over weight matrices (conv weights flattened per output).

    Biases, gains and 1-D parameters are skipped (as are names for which ``skip(name, p)`` is true)."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    total: Tensor | None = None
    for m in mods:
        for name, p in m.named_parameters():
            if p.ndim < 2 or not p.requires_grad or (skip is not None and skip(name, p)):
                continue
            w = p.flatten(1)
            gram = w @ w.t()
            off = gram * (1.0 - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))
            term = off.pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return beta * total
