"""ADA and Diffusion-GAN (train.augment: ada | diffusion) as augmentations every family with a discriminator that
reports on real images can use: the forward process's moments, the adaptive rule of p and T, exact pixel moves,
range and gradients to G, p and T adapting in real training and kept in the checkpoint (DCGAN, SAGAN/BigGAN,
StyleGAN2), and the one-line refusals. Exact resume (family state included) is tests/test_family_contract.py's."""

from __future__ import annotations

import math

import pytest
import torch

from ganforge.models.augment import (AdaAugmenter, AdaParams, DiffusionAugmenter, DiffusionParams, ada_augment,
                                     alpha_bars, diffuse, make_augmenter)
from ganforge.models.families import get_family
from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.params import ParamsError, TrainParams, load_params


def _images(n=64, size=8, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_diffusion_forward_process_mean_and_variance_at_0_and_T():
    d = DiffusionParams(t_init=300, sigma=0.5)
    aug = DiffusionAugmenter(32, d)
    assert aug.T == 300
    abar = alpha_bars(aug.T, d.beta_start, d.beta_end)
    assert abar[0] == 1 and torch.allclose(abar[1:], torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 300,
                                                                                       dtype=torch.float64), 0))
    x = torch.full((4000, 3, 4, 4), 0.7)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(diffuse(x, torch.zeros(4000, dtype=torch.long), abar, d.sigma, g), x)  # t = 0: the image
    xt = diffuse(x, torch.full((4000,), aug.T, dtype=torch.long), abar, d.sigma, g)
    a = float(abar[aug.T])
    assert a < 0.06  # T = 300 of this schedule is nearly all noise
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.003)
    assert xt.var().item() == pytest.approx((1 - a) * d.sigma ** 2, rel=0.02)
    # D's input: the diffused image and t / t_max in t_channels extra channels (constant over the image)
    out = aug(x[:16], torch.Generator().manual_seed(1))
    assert out.shape == (16, 3 + d.t_channels, 4, 4)
    assert torch.equal(out[:, 3:], out[:, 3:, :1, :1].expand(-1, -1, 4, 4))
    clean = (out[:, 3] == -1).all(dim=(1, 2))  # 2u - 1 = -1: t = 0, the image unchanged
    assert torch.equal(out[clean, :3], x[:16][clean]) and 0 < int(clean.sum()) < 16


def test_diffusion_timesteps_follow_priority_within_T():
    aug = DiffusionAugmenter(32, DiffusionParams(t_init=100, clean_fraction=0.0))
    t = aug.timesteps(20000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 1 and int(t.max()) <= 100
    assert t.double().mean().item() == pytest.approx((2 * 100 + 1) / 3, rel=0.02)  # p(t) ~ t: E[t] = (2T+1)/3


@pytest.mark.parametrize("kind", ["ada", "diffusion"])
def test_p_and_T_move_toward_the_target(kind):
    section = AdaParams(kimg=1.0, interval=2) if kind == "ada" else DiffusionParams(kimg=1.0, interval=2)
    aug = AdaAugmenter(100, section) if kind == "ada" else DiffusionAugmenter(100, section)

    def value():
        return aug.p if kind == "ada" else aug.T

    start = value()
    overfit = torch.tensor([3.0, 2.0, 1.0, 0.5, -1.0])  # E[sign] = 0.6 ... plus one: 0.6 exactly is no move
    aug.feedback(overfit)
    aug.feedback(overfit)
    assert value() == start  # r = 0.6 = target
    for _ in range(2):
        aug.feedback(torch.ones(8))  # r = 1 > 0.6: D is overfitting
    assert value() > start and aug.strength == pytest.approx(100 * 2 / 1000)
    raised = value()
    aug.feedback(torch.ones(8))
    assert value() == raised  # only every `interval` discriminator steps
    aug.feedback(-torch.ones(8))
    for _ in range(20):
        aug.feedback(-torch.ones(8))  # r = -1 < 0.6: less augmentation, never below its floor
    assert value() == (0.0 if kind == "ada" else section.t_min)
    for _ in range(40):
        aug.feedback(torch.ones(8))
    assert value() == (1.0 if kind == "ada" else section.t_max)  # and never above its ceiling
    metrics = aug.metrics()
    assert metrics[{"ada": "ada_p", "diffusion": "diffusion_T"}[kind]] == value()
    assert metrics[{"ada": "ada_rt", "diffusion": "diffusion_rd"}[kind]] == 1.0
    again = AdaAugmenter(100, section) if kind == "ada" else DiffusionAugmenter(100, section)
    again.load_state_dict(aug.state_dict())
    assert again.state_dict() == aug.state_dict() and (again.p if kind == "ada" else again.T) == value()


def test_ada_moves_pixels_exactly_and_stays_in_range():
    x = _images()
    g = torch.Generator().manual_seed(0)
    assert ada_augment(x, 0.0, AdaParams(), g) is x  # p = 0: the images themselves
    none = {k: 0.0 for k in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac", "brightness",
                             "contrast", "lumaflip", "hue", "saturation", "cutout")}
    flips = ada_augment(x, 1.0, AdaParams(**{**none, "xflip": 1.0}), g)
    for a, b in zip(flips, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    rots = ada_augment(x, 1.0, AdaParams(**{**none, "rotate90": 1.0}), g)
    for a, b in zip(rots, x):
        assert any(torch.allclose(a, torch.rot90(b, k, (1, 2)), atol=1e-5) for k in range(4))
    moved = ada_augment(x, 1.0, AdaParams(**{**none, "xint": 1.0}), g)  # whole pixels: every value is a pixel's
    gap = (moved.flatten(1)[:, :, None] - x.flatten(1)[:, None, :]).abs().amin(dim=2)
    assert gap.max() < 1e-5 and not torch.allclose(moved, x)
    # geometric transforms resample (convex combinations, reflected borders) and cutout zeroes: never out of range
    geo = AdaParams(**{**none, **{k: 1.0 for k in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso",
                                                   "xfrac", "cutout")}})
    out = ada_augment(x, 1.0, geo, g)
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5
    assert not torch.allclose(out, x)
    # color transforms are affine, as NVlabs' (no clamp): finite, with the mean colour kept on average
    full = ada_augment(x.repeat(8, 1, 1, 1), 1.0, AdaParams(), g)
    assert torch.isfinite(full).all()
    assert full.mean().item() == pytest.approx(x.mean().item(), abs=0.1)


@pytest.mark.parametrize("kind", ["diffaugment", "ada", "diffusion"])
def test_augmentations_pass_gradients_to_G(kind):
    tp = TrainParams.model_validate(dict(family="dcgan", resolution=8, batch_size=8, augment=kind,
                                         ada={"p_init": 1.0, "cutout": 1.0}, diffusion={"t_init": 400},
                                         dcgan={"width": 8, "latent_dim": 8}))
    fam = get_family(tp)
    mods = fam.build(fam.stages()[0])
    G, D = mods["G"], mods["D"]
    ctx = type("Ctx", (), {"generator": torch.Generator().manual_seed(0)})()
    fake = G(torch.randn(8, 8))
    out = fam.d_input(fake, ctx)
    assert out.shape[1] == fam.d_in_channels == (3 + tp.diffusion.t_channels if kind == "diffusion" else 3)
    D(out).sum().backward()
    grads = [p.grad for p in G.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("family,kind,section", [
    ("dcgan", "ada", {"width": 8, "latent_dim": 8}),
    ("dcgan", "diffusion", {"width": 8, "latent_dim": 8, "loss": "least-squares"}),
    ("biggan", "diffusion", {"ch": 4, "latent_dim": 20, "attention": 0}),
    ("stylegan2", "ada", {"channel_base": 64, "channel_max": 16, "latent_dim": 16, "w_dim": 16,
                          "mapping_layers": 2}),
])
def test_p_and_T_adapt_in_real_training_and_are_checkpointed(family, kind, section, digits_shards, tmp_path):
    """Each family feeds D(real) back: p / T move during training, are reported with every row, and the
    checkpoint's family state gives back the last row's value. (That it continues exactly on resume is the
    contract test's family-state check; the policy's own state round trip is test_p_and_T_move_toward_the_target.)"""
    from ganforge.tasks.loop import LocalSession, run_stage

    tp = TrainParams.model_validate(dict(
        family=family, resolution=8, batch_size=8, checkpoint_kimg=0.016, log_every=1, grid_size=2, augment=kind,
        ada={"kimg": 0.5, "interval": 1, "p_init": 0.5}, diffusion={"kimg": 0.5, "interval": 1, "t_init": 100},
        **{family: section}))
    s = LocalSession(tmp_path / "run")
    run_stage({"params": tp.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None,
               "max_steps": 6}, s)
    aug = load_state(s.checkpoints[-1])["family_state"]["augment"]
    assert aug["kind"] == kind and aug["calls"] >= 6
    start = 0.5 if kind == "ada" else (100 - 5) / (tp.diffusion.t_max - 5)
    assert aug["strength"] != start  # it moved
    key = "ada_p" if kind == "ada" else "diffusion_T"
    assert len({r[key] for r in s.reports}) > 1  # ... during the run, and every row says where it was
    fam = get_family(tp)
    fam.restore_state(load_state(s.checkpoints[-1])["family_state"])
    assert fam.augmenter.metrics()[key] == s.reports[-1][key]


def test_adaptive_augmentations_refuse_what_they_cannot_serve():
    with pytest.raises(ParamsError, match="train.augment ada .* family progan does not report: use it with "
                                          "biggan, dcgan, sagan, stylegan2"):
        load_params(None, {"train.augment": "ada"})
    with pytest.raises(ParamsError, match="sign of D\\(real\\), which a wasserstein-gp critic does not have"):
        load_params(None, {"train.family": "dcgan", "train.dcgan.loss": "wasserstein-gp", "train.augment": "ada"})
    with pytest.raises(ParamsError, match="instance_noise and train.augment diffusion"):
        load_params(None, {"train.family": "dcgan", "train.dcgan.instance_noise": 0.1, "train.augment": "diffusion"})
    with pytest.raises(ParamsError, match=r"train.diffusion.t_min \(50\) must be <= train.diffusion.t_max \(10\)"):
        load_params(None, {"train.family": "dcgan", "train.diffusion.t_min": 50, "train.diffusion.t_max": 10})
    with pytest.raises(ParamsError, match="train.ada.target"):
        load_params(None, {"train.family": "dcgan", "train.ada.target": 1.5})
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        make_augmenter(type("T", (), {"augment": "flip"})())
    assert isinstance(make_augmenter(load_params(None, {"train.family": "sagan", "train.augment": "ada"}).train),
                      AdaAugmenter)


def test_a_stage_continues_with_the_previous_stage_p():
    tp = TrainParams.model_validate(dict(family="dcgan", resolution=8, augment="ada"))
    fam = get_family(tp)
    fam.augmenter.strength = 0.25
    nxt = get_family(tp)
    nxt.restore_state(fam.checkpoint_state())
    assert nxt.augmenter.p == 0.25
    other = get_family(TrainParams.model_validate(dict(family="dcgan", resolution=8, augment="diffusion")))
    other.restore_state(fam.checkpoint_state())  # another policy's state is not taken over
    assert other.augmenter.T == other.params.diffusion.t_min



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_adaptive_augmentations_on_cuda_with_nccl_amp_and_channels_last(monkeypatch):
    """On a GPU: the same draws as on the CPU (all randomness comes from the step's CPU generator), the feedback's
    all-reduce through NCCL (CUDA tensors only), and a bf16-autocast, channels_last DCGAN step with each policy."""
    import contextlib

    import torch.distributed as dist

    from ganforge.models.family import StepContext

    x = _images(16, 16)
    cuda = x.cuda().contiguous(memory_format=torch.channels_last)
    ada = AdaAugmenter(16, AdaParams(p_init=0.8, cutout=1.0))
    a, b = ada(x, torch.Generator().manual_seed(3)), ada(cuda, torch.Generator().manual_seed(3))
    assert b.is_cuda and torch.allclose(a, b.cpu(), atol=1e-4)  # ADA draws only per-image parameters on the CPU
    dif = DiffusionAugmenter(16, DiffusionParams(t_init=200))  # its noise comes from a CUDA generator seeded ...
    a, b = dif(cuda, torch.Generator().manual_seed(3)), dif(cuda, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, dif(cuda, torch.Generator().manual_seed(4)))  # ... by the step's
    clean = (a[:, 3] == -1).all(dim=(1, 2))
    assert torch.equal(a[clean, :3], cuda[clean])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        aug = AdaAugmenter(100, AdaParams(kimg=1.0, interval=1))
        aug.feedback(torch.ones(8, device="cuda"))
        assert aug.p == pytest.approx(0.1)
        sections = {"dcgan": {"width": 16, "latent_dim": 16},  # StyleGAN2's R1 differentiates through ADA twice
                    "stylegan2": {"channel_base": 256, "channel_max": 16, "latent_dim": 16, "w_dim": 16}}
        for family, kind in (("dcgan", "diffaugment"), ("dcgan", "ada"), ("dcgan", "diffusion"),
                             ("stylegan2", "ada"), ("stylegan2", "diffusion")):
            tp = TrainParams.model_validate(dict(family=family, resolution=16, batch_size=16, augment=kind,
                                                 ada={"p_init": 0.5}, diffusion={"t_init": 100},
                                                 **{family: sections[family]}))
            fam = get_family(tp)
            mods = {k: m.cuda().to(memory_format=torch.channels_last) for k, m in fam.build(fam.stages()[0]).items()}
            opts = fam.optimizers(mods)
            batch = {"image": cuda, "label": torch.zeros(16, dtype=torch.long, device="cuda")}
            ctx = StepContext(0, 0, torch.Generator().manual_seed(0), torch.device("cuda"),
                              lambda: torch.autocast("cuda", dtype=torch.bfloat16), lambda m: contextlib.nullcontext())
            out = fam.train_step(mods, opts, batch, fam.stages()[0], ctx)
            assert "r1_penalty" in out or family != "stylegan2"  # step 0: the lazy R1 ran
            assert all(math.isfinite(v) for v in out.values()), (family, kind, out)
    finally:
        dist.destroy_process_group()


def test_ada_resampling_is_grid_sample_and_differentiable_twice():
    """The geometric transforms resample as F.grid_sample (bilinear, reflection, align_corners=False) does, from
    gathers, so R1 (a gradient of a gradient) works through them on every device (StyleGAN2 + ADA)."""
    import torch.nn.functional as F

    from ganforge.models.augment import _apply_geometric, ada_geometric

    x = _images(16, 8).double()
    mats = ada_geometric(16, 8, 1.0, AdaParams(), torch.Generator().manual_seed(0)).double()
    grid = F.affine_grid(mats[:, :2, :], list(x.shape), align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert torch.allclose(_apply_geometric(x, mats), ref, atol=1e-5)  # coordinates in float32
    xr = x.clone().requires_grad_(True)
    w = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    score = (_apply_geometric(xr, mats).tanh() * w).sum()  # a tiny "D"
    (g,) = torch.autograd.grad(score, xr, create_graph=True)
    g.pow(2).sum().backward()  # R1's double backward
    assert w.grad is not None and torch.isfinite(w.grad).all() and float(w.grad.abs().sum()) > 0
