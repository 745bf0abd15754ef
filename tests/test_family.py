"""The open family interface: the registry (built-ins + entry points), per-family params sections, the shared
losses / regularizers / augmentations, family state and extra batch draws under exact resume, the sampler
contract, and the promotion gate's direction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import stop_and_resume

from ganforge.models import losses, regularizers
from ganforge.models.augment import augment
from ganforge.models.families import family_classes, get_family
from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import Params, ParamsError, TrainParams, load_params


def test_registry_has_builtins_and_plugin_families():
    names = set(family_classes())
    assert {"progan", "vqgan"} <= names  # scanned from ganforge.models.families
    assert {"toyvae", "progan_faulty", "vqgan_faulty"} <= names  # entry points of tests/plugins
    tp = TrainParams()
    assert all(hasattr(tp, n) for n in names)  # one params section per family
    schema = Params.model_json_schema()["$defs"]["TrainParams"]["properties"]
    assert set(schema["family"]["enum"]) == names  # the UI's drop-down


def test_family_params_are_validated_by_the_family():
    with pytest.raises(ParamsError, match=r"train.family: .*toyvae.*\(got 'nope'\)"):
        load_params(None, {"train.family": "nope"})
    with pytest.raises(ParamsError, match="train.progan.start_resolution .* exceeds train.resolution"):
        load_params(None, {"train.resolution": 8, "train.progan.start_resolution": 16})
    with pytest.raises(ParamsError, match=r"train.toyvae.width: .*greater than or equal to 4"):
        load_params(None, {"train.toyvae.width": 2})
    with pytest.raises(ParamsError, match="train.toyvae.nonsense: unknown key"):
        load_params(None, {"train.toyvae.nonsense": 1})
    p = load_params(None, {"train.family": "toyvae", "train.toyvae.stages": 3})
    assert [s.name for s in get_family(p.train).stages()] == ["toyvae-1", "toyvae-2", "toyvae-3"]


@pytest.mark.parametrize("kind,real,fake,d,g", [
    ("hinge", 2.0, -2.0, 0.0, 2.0),
    ("least-squares", 1.0, 0.0, 0.0, 0.5),
    ("wasserstein", 3.0, 1.0, -2.0, -1.0),
    ("non-saturating", 0.0, 0.0, 2 * math.log(2), math.log(2)),
    ("minimax", 0.0, 0.0, 2 * math.log(2), -math.log(2)),
])
def test_adversarial_losses(kind, real, fake, d, g):
    r, f = torch.full((4, 1), real), torch.full((4, 1), fake)
    assert float(losses.d_loss(kind, r, f)) == pytest.approx(d, abs=1e-6)
    assert float(losses.g_loss(kind, f)) == pytest.approx(g, abs=1e-6)
    with pytest.raises(ValueError, match="allowed: minimax, non-saturating"):
        losses.d_loss("vanilla", r, f)


def test_regularizers_on_known_critics():
    w = torch.randn(3 * 4 * 4)
    w = w / w.norm()  # a linear critic with unit-norm gradient: zero gradient penalty, R1 = ||w||^2 = 1

    def critic(x):
        return (x.flatten(1) * w).sum(1, keepdim=True)

    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    eps = torch.rand(5, 1, 1, 1)
    assert float(regularizers.gradient_penalty(critic, real, fake, eps)) == pytest.approx(0.0, abs=1e-10)
    x = real.clone().requires_grad_(True)
    assert float(regularizers.r1_penalty(critic(x), x)) == pytest.approx(1.0, abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    lin = nn.Linear(6, 6, bias=True)
    with torch.no_grad():
        lin.weight.copy_(q)
    assert float(regularizers.orthogonal_penalty(lin).detach()) == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        lin.weight.copy_(torch.ones(6, 6))
    assert float(regularizers.orthogonal_penalty(lin, beta=1.0).detach()) == pytest.approx(30 * 36)  # W W^T = 6: 30 off-diagonal
    # path length: mean moves toward the observed lengths, penalty is non-negative and differentiable
    wlat = torch.randn(4, 8, requires_grad=True)
    imgs = torch.tanh(wlat @ torch.randn(8, 3 * 4 * 4)).view(4, 3, 4, 4)  # nonlinear: the lengths depend on w
    pen, mean = regularizers.path_length_penalty(imgs, wlat, torch.zeros(()), generator=torch.Generator().manual_seed(0))
    assert pen >= 0 and mean > 0 and pen.requires_grad


def test_diffaugment_is_differentiable_and_reproducible():
    leaf = torch.rand(4, 3, 16, 16, requires_grad=True)
    x = leaf * 2 - 1
    a = augment("diffaugment", x, torch.Generator().manual_seed(1))
    b = augment("diffaugment", x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    a.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert torch.equal(augment("none", x, torch.Generator()), x)
    with pytest.raises(ValueError, match="allowed: none, diffaugment"):
        augment("ada", x, torch.Generator())


def _toy(**kw) -> TrainParams:
    return TrainParams.model_validate(dict(family="toyvae", resolution=8, batch_size=8, checkpoint_kimg=0.016,
                                           log_every=1, grid_size=2, toyvae=dict(width=8, **kw)))


def test_family_state_and_extra_draws_resume_exactly(digits_shards, tmp_path):
    """A family's own state (toyvae's KL warm-up counter) and batches drawn inside a step (ctx.next_batch, as
    n_critic needs) are checkpointed: stopping and resuming gives the same weights as one uninterrupted run."""
    p = _toy(extra_batches=1, kl_warmup_steps=10)
    base = {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None}
    full, part, resumed = stop_and_resume(base, tmp_path, 2, 6)
    a, b = load_state(full), load_state(resumed)
    assert a["family_state"] == b["family_state"] == {"steps_seen": 6}
    assert a["batches_drawn"] == b["batches_drawn"] == 12  # one batch per step + one extra
    for m in a["modules"]:
        for k in a["modules"][m]:
            assert torch.allclose(a["modules"][m][k], b["modules"][m][k], rtol=0, atol=1e-6), (m, k)
    # without the family state the resumed run would restart the warm-up and differ
    assert load_state(part)["family_state"] == {"steps_seen": 2}


def test_sampler_contract(digits_shards, tmp_path):
    """One seed -> one latent, in one place: samples do not depend on the batch they are drawn in; a family
    without a truncation trick refuses one; labels are checked for conditional families."""
    p = _toy()
    s = LocalSession(tmp_path / "c")
    run_stage({"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None,
               "max_steps": 2}, s)
    from ganforge.tasks.checkpoint import load_generator

    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    both = fam.sample(ema, stage, [3, 7])
    assert both.shape == (2, 3, 8, 8) and torch.allclose(fam.sample(ema, stage, [7])[0], both[1], atol=1e-6)
    with pytest.raises(ValueError, match="no truncation trick"):
        fam.sample(ema, stage, [1], truncation=0.7)
    fam.num_classes = 3
    assert fam.label_for(7) == 1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        fam.sample(ema, stage, [1], labels=[5])


def test_every_ema_copy_is_an_average_of_its_module(digits_labelled_shards, tmp_path):
    """Regression: the EMA update of the modules after the first (SGAN keeps G, D and C) must use the EMA's own
    beta; a buffer of the first (G's BatchNorm step counter) once took its place, and D's copy diverged."""
    p = TrainParams.model_validate(dict(family="sgan", resolution=16, batch_size=16, checkpoint_kimg=10,
                                        sgan=dict(width=8, latent_dim=8)))
    s = LocalSession(tmp_path / "s")
    run_stage({"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_labelled_shards),
               "run_dir": None, "max_steps": 12}, s)
    st = load_state(s.checkpoints[-1])
    assert set(st["ema"]) == {"G", "D", "C"}
    for m in st["ema"]:
        gap = max(float((st["ema"][m][k].float() - st["modules"][m][k].float()).abs().max()) for k in st["ema"][m])
        assert gap < 0.5, (m, gap)
