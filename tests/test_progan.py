"""ProGAN networks and the shared loop in-process (no Ray): fade-in, equalized LR, the checkpoint's contents.
Exact resume of every family is tests/test_family_contract.py's."""

import math

import pytest
import torch
import torch.nn.functional as F

from ganforge.models.nn.equalized import EqualizedConv2d, EqualizedLinear, MinibatchStd
from ganforge.models.families.progan import ProGAN, fade_reals
from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import TrainParams


def tiny_params(**kw) -> TrainParams:
    base = dict(resolution=16, batch_size=8, checkpoint_kimg=0.04, log_every=2, ema_half_life_kimg=0.1,
                progan=dict(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.08, stabilize_kimg=0.08))
    base.update(kw)
    return TrainParams.model_validate(base)


def _stage_models(p: TrainParams, index: int):
    fam = ProGAN(p)
    st = fam.stages()[index]
    return fam, st, fam.build(st)


def test_stage_plan():
    fam = ProGAN(tiny_params())
    st = fam.stages()
    assert [s.resolution for s in st] == [4, 8, 16]
    assert st[0].kimg == pytest.approx(0.08) and st[1].kimg == pytest.approx(0.16)
    assert fam.alpha(st[1], 0) == 0.0 and fam.alpha(st[1], 40) == pytest.approx(0.5) and fam.alpha(st[1], 500) == 1.0
    assert fam.alpha(st[0], 0) == 1.0


def test_fade_in_continuity_generator_and_discriminator():
    p = tiny_params()
    torch.manual_seed(0)
    fam, s8, m8 = _stage_models(p, 1)
    _, s16, m16 = _stage_models(p, 2)
    fam.grow(m16, {k: m.state_dict() for k, m in m8.items()})
    z = torch.randn(4, 16)
    with torch.no_grad():
        g_old = F.interpolate(m8["G"](z, 1.0), scale_factor=2, mode="nearest")
        g_new = m16["G"](z, 0.0)
        assert torch.equal(g_new, g_old)
        img = torch.rand(4, 3, 16, 16) * 2 - 1
        d_old = m8["D"](F.avg_pool2d(img, 2), 1.0)
        d_new = m16["D"](img, 0.0)
        assert torch.allclose(d_new, d_old, atol=1e-6)
        # alpha > 0 actually changes the output (the new block is live)
        assert not torch.allclose(m16["G"](z, 0.5), g_old)


def test_fade_reals_endpoints():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fade_reals(x, 1.0), x)
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    assert torch.allclose(fade_reals(x, 0.0), low)


def test_equalized_lr_scale_and_storage():
    conv = EqualizedConv2d(32, 8, 3, 1)
    assert conv.scale == pytest.approx(math.sqrt(2 / (32 * 9)))
    assert abs(conv.weight.std().item() - 1.0) < 0.1  # stored N(0,1)
    lin = EqualizedLinear(64, 10, gain=1.0)
    assert lin.scale == pytest.approx(1 / 8)
    x = torch.randn(5, 32, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.scale, conv.bias, padding=1))


def test_minibatch_std_adds_a_feature():
    x = torch.randn(8, 5, 4, 4)
    y = MinibatchStd(4)(x)
    assert y.shape == (8, 6, 4, 4)
    same = torch.ones(8, 5, 4, 4)
    assert torch.allclose(MinibatchStd(4)(same)[:, -1], torch.full((8, 4, 4), 1e-4), atol=1e-5)


def test_checkpoint_is_complete(digits_shards, tmp_path):
    p = tiny_params()
    s = LocalSession(tmp_path / "c")
    run_stage({"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": str(tmp_path),
               "max_steps": 6}, s)
    assert len(s.checkpoints) >= 2  # interval 40 images = every 5 steps, plus the end
    st = load_state(s.checkpoints[-1])
    assert set(st["modules"]) == {"G", "D"} and set(st["ema"]) == {"G"} and set(st["optimizers"]) == {"G", "D"}
    assert st["step"] == 6 and st["images_in_stage"] == 48 and st["stage"] == "progan-r0004" and st["alpha"] == 1.0
    assert TrainParams.model_validate(st["params"]) == p
    assert (tmp_path / "c" / s.checkpoints[-1].split("/")[-1] / "rng-0.pt").exists()
    assert sorted(x.name for x in (tmp_path / "samples").iterdir())[0].startswith("progan-r0004-")
    with pytest.raises(FileNotFoundError, match="state.pt"):
        load_state(tmp_path)


def test_resume_refuses_checkpoint_of_another_stage(digits_shards, tmp_path):
    p = tiny_params()
    s = LocalSession(tmp_path / "c")
    cfg = {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None, "max_steps": 2}
    run_stage(cfg, s)
    with pytest.raises(ValueError, match="not progan-r0008"):
        run_stage({**cfg, "stage": 1}, LocalSession(tmp_path / "d", resume_from=s.checkpoints[-1]))
