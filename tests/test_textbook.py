"""The textbook GANs (DCGAN with every loss, WGAN, WGAN-GP, LSGAN, CGAN) and the semi-supervised GAN: loss
values, the Lipschitz constraints, n_critic's fresh batches (each counted), conditioning, the labelled subset
and its mixed stream, the baseline, and refusals of data a family cannot train on. Exact resume of every family
is tests/test_family_contract.py's; the semi-supervised GAN's Prefect flow (a classifier product) is in
test_pipeline.py."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from ganforge.models import losses
from ganforge.models.families import get_family
from ganforge.models.families.dcgan import Discriminator
from ganforge.models.family import StepContext
from ganforge.tasks.checkpoint import load_generator, load_state
from ganforge.tasks.data import LabelledMixStream, iter_split
from ganforge.tasks.errors import ShardError
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import DataParams, Params, ParamsError, TrainParams, load_params
from ganforge.tasks.shard import shard


def _train(family: str, resolution: int = 16, **section) -> TrainParams:
    return TrainParams.model_validate(dict(family=family, resolution=resolution, batch_size=8, checkpoint_kimg=0.5,
                                           log_every=1, grid_size=3, **{family: dict(width=8, latent_dim=8, **section)}))


def _config(p: TrainParams, shards, **kw) -> dict:
    return {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(shards), "run_dir": None, **kw}


@pytest.mark.parametrize("kind,real,fake,target,d", [
    ("hinge", 1.0, -1.0, 1.0, 0.0),  # the margin is met on both sides
    ("least-squares", 0.9, 0.0, 0.9, 0.0),  # smoothed target reached exactly
    ("least-squares", 1.0, 0.0, 0.9, 0.5 * 0.01),
    ("non-saturating", 0.0, 0.0, 0.9, 2 * math.log(2)),  # at D = 1/2 every target costs log 2
    ("minimax", 2.0, -50.0, 0.8, 0.8 * math.log1p(math.exp(-2)) + 0.2 * math.log1p(math.exp(2))),
])
def test_losses_with_one_sided_smoothing(kind, real, fake, target, d):
    r, f = torch.full((3, 1), real), torch.full((3, 1), fake)
    assert float(losses.d_loss(kind, r, f, real_target=target)) == pytest.approx(d, abs=1e-6)
    with pytest.raises(ValueError, match="label smoothing needs a loss with targets"):
        losses.d_loss("hinge", r, f, real_target=0.9)


def test_dcgan_architecture_and_settings_follow_the_papers():
    fam = get_family(_train("dcgan", 32))
    mods = fam.build(fam.stages()[0])
    G, D = mods["G"], mods["D"]
    assert G(torch.randn(2, 8)).shape == (2, 3, 32, 32)
    bn = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3 and isinstance(list(G.net)[-1], torch.nn.Tanh)  # BN everywhere but the output
    assert not isinstance(list(D.body)[1], torch.nn.BatchNorm2d)  # no BN on D's input layer
    convs = torch.cat([m.weight.detach().flatten() for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
    assert abs(float(convs.std()) - 0.02) < 0.002  # N(0, 0.02)
    s = fam.s
    assert (s["n_critic"], s["optimizer"], s["betas"], s["d_norm"]) == (1, "adam", (0.5, 0.999), "batch")
    s = get_family(_train("dcgan", loss="wasserstein")).s
    assert (s["n_critic"], s["optimizer"], s["lr_d"]) == (5, "rmsprop", 5e-5)
    s = get_family(_train("dcgan", loss="wasserstein-gp")).s
    assert (s["n_critic"], s["optimizer"], s["betas"], s["d_norm"]) == (5, "adam", (0.0, 0.9), "layer")
    s = get_family(_train("dcgan", lr_g=1e-4, lr_d=4e-4)).s  # TTUR
    assert (s["lr_g"], s["lr_d"]) == (1e-4, 4e-4)
    with pytest.raises(ParamsError, match="label_smoothing needs a loss with targets"):
        load_params(None, {"train.family": "dcgan", "train.dcgan.loss": "hinge", "train.dcgan.label_smoothing": 0.1})
    with pytest.raises(ParamsError, match="d_norm batch breaks wasserstein-gp"):
        load_params(None, {"train.family": "dcgan", "train.dcgan.loss": "wasserstein-gp", "train.dcgan.d_norm": "batch"})
    with pytest.raises(ParamsError, match=r"train.dcgan.loss: .*least-squares"):
        load_params(None, {"train.dcgan.loss": "lsgan"})


def test_weight_clipping_bounds_every_critic_weight(digits_shards, tmp_path):
    p = _train("dcgan", loss="wasserstein", clip=0.01, n_critic=2)
    s = LocalSession(tmp_path / "w")
    run_stage(_config(p, digits_shards, max_steps=2), s)
    d = load_state(s.checkpoints[-1])["modules"]["D"]
    weights = torch.cat([v.flatten() for k, v in d.items() if "running" not in k and "num_batches" not in k])
    assert float(weights.abs().max()) <= 0.01 + 1e-9
    assert float(weights.abs().max()) == pytest.approx(0.01)  # the bound is active, not vacuous


def test_n_critic_draws_fresh_batches_and_counts_them(digits_shards, tmp_path):
    """Five critic updates see five distinct real batches in one step, and the stage counts all of them as images
    shown. (Extra draws under exact resume: tests/test_family.py; every family's resume: the contract test.)"""
    p = _train("dcgan", loss="wasserstein-gp")
    fam = get_family(p)
    stage = fam.stages()[0]
    mods = fam.build(stage)
    opts = fam.optimizers(mods)
    seen: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        b = {"image": torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, "label": torch.zeros(4, dtype=torch.long)}
        seen.append(b["image"])
        return b

    first = batch()
    D = mods["D"]
    inputs: list[torch.Tensor] = []
    hook = D.body.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    ctx = StepContext(0, 0, torch.Generator().manual_seed(1), torch.device("cpu"), contextlib.nullcontext,
                      lambda m: contextlib.nullcontext(), batch)
    fam.train_step(mods, opts, first, stage, ctx)
    hook.remove()
    assert len(seen) == 5 and len({float(x.sum()) for x in seen}) == 5
    for x in seen:  # every drawn batch went through the critic as real images
        assert any(torch.equal(x, i) for i in inputs)

    s = LocalSession(tmp_path / "n")
    run_stage(_config(p, digits_shards, max_steps=2), s)
    st = load_state(s.checkpoints[-1])
    assert st["step"] == 2 and st["batches_drawn"] == 10
    assert st["images_in_stage"] == 10 * 8  # every critic batch counts


def test_cgan_follows_its_labels(digits_shards, tmp_path):
    p = _train("dcgan", conditional=True, feature_matching=True, minibatch_std=True, instance_noise=0.1,
               label_smoothing=0.1)
    s = LocalSession(tmp_path / "c")
    run_stage(_config(p, digits_shards, max_steps=3), s)
    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    assert fam.num_classes == 10
    a = fam.sample(ema, stage, [5] * 10, labels=list(range(10)))
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, 10))  # one latent, ten classes, ten images
    assert torch.allclose(fam.sample(ema, stage, [5], labels=[3])[0], a[3], atol=1e-6)
    seeds = list(range(9))
    grid = fam.grid(ema, stage, seeds, lambda: None)
    for i in range(9):  # row r (grid_size 3) holds class r
        assert torch.allclose(grid[i], fam.sample(ema, stage, [seeds[i]], labels=[i // 3])[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fam.sample(ema, stage, [1], labels=[10])


def test_labelled_subset_is_deterministic_and_balanced(digits_labelled_shards, tmp_path):
    m = json.loads((digits_labelled_shards / "manifest.json").read_text())
    assert m["splits"]["labelled"]["count"] == 100 and m["count"] == 1797  # copies are not counted twice
    _, labels = next(iter_split(digits_labelled_shards, "labelled", 1000))
    assert np.bincount(labels).tolist() == [10] * 10
    again = tmp_path / "again"
    shard("digits", again, DataParams(resolution=16, shard_size=400, workers=2, labelled_per_class=10), progress=False)
    assert json.loads((again / "manifest.json").read_text())["labelled"] == m["labelled"]
    assert len(m["labelled"]["keys"]) == 100
    with pytest.raises(ShardError, match="fewer images of class"):
        shard("synthetic:shapes:30", tmp_path / "few", DataParams(resolution=8, workers=1, labelled_per_class=20),
              progress=False)
    with pytest.raises(ShardError, match="needs a labelled source"):
        shard("synthetic:gradients:30", tmp_path / "none", DataParams(resolution=8, workers=1, labelled_per_class=2),
              progress=False)


def test_every_batch_of_every_rank_holds_labels(digits_labelled_shards):
    for rank in range(2):
        stream = LabelledMixStream(digits_labelled_shards, 16, 8, labelled=3, rank=rank, world_size=2, seed=1)
        it = iter(stream)
        for _ in range(40):  # more than the labelled split's share of this rank: it wraps around
            x, y = next(it)
            assert x.shape == (8, 3, 16, 16) and (y[:3] >= 0).all() and (y[3:] == -1).all()
        again = next(iter(LabelledMixStream(digits_labelled_shards, 16, 8, labelled=3, rank=rank, world_size=2, seed=1,
                                            start_batch=39)))
        assert torch.equal(again[0], x)  # resume-exact


def test_sgan_trains_d_and_the_baseline_and_scores_both(digits_labelled_shards, tmp_path):
    p = _train("sgan", kimg=0.08)
    s = LocalSession(tmp_path / "s")
    run_stage(_config(p, digits_labelled_shards), s)
    metrics = s.reports[-1]
    assert metrics["labelled_per_batch"] == 4 and {"loss_sup", "loss_unsup", "loss_baseline"} <= set(metrics)
    from ganforge.tasks.evaluate import _model_inputs
    from ganforge.tasks.params import EvalParams

    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    assert fam.product == "classifier" and set(ema) == {"G", "D", "C"}
    scores = fam.extra_scores(ema, stage, lambda: _model_inputs(digits_labelled_shards, EvalParams(), 16))
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["baseline_accuracy"] <= 1
    assert scores["accuracy_gain"] == pytest.approx(scores["accuracy"] - scores["baseline_accuracy"])
    probs = fam.classify(ema, stage, torch.zeros(2, 3, 16, 16))
    assert probs.shape == (2, 10) and torch.allclose(probs.sum(1), torch.ones(2))


def test_data_a_family_cannot_train_on_is_refused(digits_shards, digits_labelled_shards, tmp_path):
    from ganforge.tasks.train import train_stage

    plain = tmp_path / "plain"
    shard("synthetic:gradients:40", plain, DataParams(resolution=8, workers=1), progress=False)
    p = Params.model_validate({"train": dict(family="dcgan", resolution=8, out=str(tmp_path / "r"),
                                             dcgan=dict(conditional=True))})
    with pytest.raises(ParamsError, match=r"class-conditional \(10 classes\) but the shards in .* have no labels"):
        train_stage(plain, p.train.out, p, 0)
    p = Params.model_validate({"train": dict(family="dcgan", resolution=8, out=str(tmp_path / "r2"),
                                             dcgan=dict(conditional=True, num_classes=3))})
    with pytest.raises(ParamsError, match="set for 3 classes but the shards .* have 10"):
        train_stage(digits_shards, p.train.out, p, 0)
    p = Params.model_validate({"train": dict(family="sgan", resolution=8, out=str(tmp_path / "r3"))})
    with pytest.raises(ParamsError, match="needs a labelled subset .* --labelled-per-class N"):
        train_stage(digits_shards, p.train.out, p, 0)
    p = Params.model_validate({"train": dict(family="sgan", resolution=8, out=str(tmp_path / "r4"),
                                             sgan=dict(num_classes=3))})
    with pytest.raises(ParamsError, match="sgan is set for 3 classes but the shards .* have 10"):
        train_stage(digits_labelled_shards, p.train.out, p, 0)
    with pytest.raises(ParamsError, match="at least 2 images per worker"):
        load_params(None, {"train.family": "sgan", "train.batch_size": 2, "train.workers": 2})
    d = Discriminator(16, 8, num_classes=10)
    with pytest.raises(ValueError, match="conditional discriminator needs labels"):
        d(torch.zeros(1, 3, 16, 16))
