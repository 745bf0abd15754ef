"""SAGAN and BigGAN: spectral norm, self-attention, projection D, orthogonal regularisation, truncation, D steps
(fresh batches, counted; the spectral-norm state and the EMA start), labels through grids and samples, and
DiffAugment as one switch for every family with a discriminator. Exact resume, gradients and the sampler contract
of every family are tests/test_family_contract.py's; the Prefect flow and `dvc repro` of a single-stage GAN
(StyleGAN2, whose plumbing these families share) in test_pipeline.py and test_dvc.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ganforge.models import regularizers
from ganforge.models.families import get_family
from ganforge.models.family import StepContext
from ganforge.models.nn.biggan import SelfAttention, truncated_normal
from ganforge.tasks.checkpoint import load_generator, load_state
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import ParamsError, TrainParams, load_params


def _train(family: str, resolution: int = 16, augment: str = "none", **section) -> TrainParams:
    return TrainParams.model_validate(dict(family=family, resolution=resolution, batch_size=8, checkpoint_kimg=0.5,
                                           log_every=1, grid_size=3, augment=augment,
                                           **{family: dict(ch=4, latent_dim=20, attention=8, **section)}))


def _config(p: TrainParams, shards, **kw) -> dict:
    return {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(shards), "run_dir": None, **kw}


@pytest.mark.parametrize("family", ["sagan", "biggan"])
def test_spectral_norm_attention_and_projection(family):
    fam = get_family(_train(family))
    mods = fam.build(fam.stages()[0])
    G, D = mods["G"], mods["D"]
    G.train()
    z, y = torch.randn(4, 20), torch.tensor([0, 1, 2, 3])
    for _ in range(20):  # power iterations run in training-mode forwards
        D(G(z, y), y)
    normed = [m for m in list(G.modules()) + list(D.modules()) if hasattr(m, "parametrizations")
              and not isinstance(m, torch.nn.Embedding)]
    assert len(normed) > 10
    for m in normed:
        w = m.weight.detach()
        w = w.flatten(1) if w.ndim > 1 else w[None]
        assert float(torch.linalg.matrix_norm(w, 2)) == pytest.approx(1.0, abs=0.05)
    assert any(isinstance(m, SelfAttention) for m in G.modules()) and any(isinstance(m, SelfAttention) for m in D.modules())
    x = G(z, y).detach()
    assert not torch.allclose(D(x, y), D(x, (y + 1) % 10))  # the projection reads the label


def test_self_attention_is_identity_at_zero_gamma():
    a = SelfAttention(16)
    h = torch.randn(2, 16, 8, 8)
    assert torch.equal(a(h), h)
    with torch.no_grad():
        a.gamma.fill_(0.5)
    assert not torch.allclose(a(h), h)


def test_truncation_and_orthogonal_regularisation():
    t = truncated_normal((4000, 16), 0.5, torch.Generator().manual_seed(0))
    assert float(t.abs().max()) <= 0.5 and float(t.std()) < 0.35  # resampled inside, not scaled to it
    fam = get_family(_train("biggan"))
    a = fam.latent_for(7, 0.5)
    assert float(a.abs().max()) <= 0.5 and torch.equal(a, fam.latent_for(7, 0.5))  # per seed, deterministic
    assert torch.equal(fam.latent_for(7, None), fam.latent(7))
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    lin = torch.nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(q)
    assert float(regularizers.orthogonal_penalty(lin).detach()) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no truncation trick"):
        get_family(_train("sagan")).sample({}, None, [1], truncation=0.5)


def test_d_steps_draw_fresh_batches(digits_shards):
    p = _train("biggan", d_steps=2)
    fam = get_family(p)
    stage = fam.stages()[0]
    mods = fam.build(stage)
    opts = fam.optimizers(mods)
    drawn = []
    gen = torch.Generator().manual_seed(0)

    def batch():
        b = {"image": torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, "label": torch.arange(4)}
        drawn.append(b)
        return b

    ctx = StepContext(0, 0, torch.Generator().manual_seed(1), torch.device("cpu"), contextlib.nullcontext,
                      lambda m: contextlib.nullcontext(), batch)
    fam.train_step(mods, opts, batch(), stage, ctx)
    assert len(drawn) == 2 and not torch.equal(drawn[0]["image"], drawn[1]["image"])


def test_d_step_batches_count_and_the_ema_starts_late(digits_shards, tmp_path):
    """Every batch a D step draws counts as images shown; the power-iteration vectors are in the checkpoint; before
    ema_start_kimg the EMA copy is G itself. (Exact resume is tests/test_family_contract.py's.)"""
    p = _train("biggan", d_steps=2, ema_start_kimg=0.032)
    s = LocalSession(tmp_path / "b")
    run_stage(_config(p, digits_shards, max_steps=2), s)
    st = load_state(s.checkpoints[-1])
    assert st["images_in_stage"] == 2 * 2 * 8 and st["batches_drawn"] == 4
    assert any(k.endswith("_u") for k in st["modules"]["G"])  # power-iteration vectors are checkpointed
    for k, v in st["modules"]["G"].items():  # 32 images: not past ema_start_kimg yet
        assert torch.allclose(v.float(), st["ema"]["G"][k].float()), k


def test_labels_reach_grid_and_samples(digits_shards, tmp_path):
    p = _train("sagan")
    s = LocalSession(tmp_path / "s")
    run_stage(_config(p, digits_shards, max_steps=2), s)
    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    seeds = list(range(9))
    grid = fam.grid(ema, stage, seeds, lambda: None)
    for i in range(9):
        assert torch.allclose(grid[i], fam.sample(ema, stage, [seeds[i]], labels=[i // 3])[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fam.sample(ema, stage, [1], labels=[11])


@pytest.mark.parametrize("family,section", [("dcgan", {"width": 8, "latent_dim": 8}), ("progan", {
    "fmap_max": 8, "fmap_base": 32, "latent_dim": 8, "stabilize_kimg": 0.016}), ("sgan", {"width": 8, "latent_dim": 8})])
def test_diffaugment_is_one_switch_for_every_family(family, section, digits_shards, digits_labelled_shards, tmp_path):
    shards = digits_labelled_shards if family == "sgan" else digits_shards
    ps = [TrainParams.model_validate(dict(family=family, resolution=8, batch_size=8, checkpoint_kimg=1, log_every=1,
                                          grid_size=2, augment=a, **{family: section})) for a in ("none", "diffaugment")]
    ends = []
    for p in ps:
        s = LocalSession(tmp_path / p.augment)
        run_stage(_config(p, shards, max_steps=2), s)
        ends.append(load_state(s.checkpoints[-1])["modules"]["D"])
    assert any(not torch.allclose(ends[0][k].float(), ends[1][k].float()) for k in ends[0])  # D saw other inputs
    with pytest.raises(ParamsError, match="train.augment"):
        load_params(None, {"train.augment": "ada"})


def test_intra_class_fid_averages_classes_and_reports_small_ones():
    import numpy as np

    from ganforge.tasks.metrics import METRICS, MetricInputs, feature_stats, frechet_distance
    from ganforge.tasks.params import EvalParams

    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (80, 6)), rng.normal(3, 1, (80, 6)), rng.normal(0, 1, (5, 6))])
    real_labels = np.array([0] * 80 + [1] * 80 + [2] * 5)
    fake = np.concatenate([rng.normal(0, 1, (60, 6)), rng.normal(0, 1, (60, 6)), rng.normal(0, 1, (60, 6))])
    fake_labels = np.array([0] * 60 + [1] * 60 + [2] * 60)  # class 1 is drawn from the wrong distribution
    x = MetricInputs({"features": real}, fake, lambda b: iter(()), EvalParams(class_min_images=50),
                     real_labels=real_labels, fake_labels=fake_labels)
    out = METRICS["intra_fid"].compute(x)
    per = {c: frechet_distance(*feature_stats(real[real_labels == c]), *feature_stats(fake[fake_labels == c]))
           for c in (0, 1)}
    assert out["intra_fid_classes"] == pytest.approx({"0": per[0], "1": per[1]})
    assert out["intra_fid"] == pytest.approx((per[0] + per[1]) / 2) and per[1] > 10 * per[0]
    assert out["intra_fid_too_few"] == {"2": {"reference": 5, "samples": 60}}  # reported, not averaged in
    none = METRICS["intra_fid"].compute(MetricInputs({"features": real}, fake, lambda b: iter(()), EvalParams()))
    assert none["intra_fid"] is None and "not a class-conditional" in none["intra_fid_unavailable"]
    few = METRICS["intra_fid"].compute(MetricInputs({"features": real}, fake, lambda b: iter(()),
                                                    EvalParams(class_min_images=500), real_labels=real_labels,
                                                    fake_labels=fake_labels))
    assert few["intra_fid"] is None and "eval.class_min_images" in few["intra_fid_unavailable"]


def test_small_data_cut_keeps_the_val_split(tmp_path):
    """`--max-train-images N` (the DiffAugment experiment's 200 digits): the first N train images of the seeded
    order, the same val split as the full set."""
    import json

    from ganforge.tasks.params import DataParams
    from ganforge.tasks.shard import shard

    full = shard("synthetic:shapes:40", tmp_path / "full", DataParams(resolution=8, workers=1), progress=False)
    cut = shard("synthetic:shapes:40", tmp_path / "cut", DataParams(resolution=8, workers=1, max_train_images=10),
                progress=False)
    assert cut["splits"]["train"]["count"] == 10 and cut["splits"]["val"] == full["splits"]["val"]
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["params"]["max_train_images"] == 10


def test_biggan_grid_truncation_and_standing_stats(digits_shards, tmp_path):
    p = _train("biggan", grid_truncation=0.5, standing_stats=2)
    s = LocalSession(tmp_path / "b")
    run_stage(_config(p, digits_shards, max_steps=2), s)
    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    seeds = list(range(9))
    grid = fam.grid(ema, stage, seeds, lambda: None)
    assert torch.allclose(grid[4], fam.sample(ema, stage, [4], labels=[1], truncation=0.5)[0], atol=1e-5)
    assert not torch.allclose(grid[4], fam.sample(ema, stage, [4], labels=[1])[0])
    with_stats = fam.sample(ema, stage, [1, 2])
    assert torch.equal(with_stats, fam.sample(ema, stage, [1, 2]))  # standing statistics are deterministic
    fam.p.standing_stats = 0
    assert not torch.allclose(with_stats, fam.sample(ema, stage, [1, 2]))


def test_low_rank_frechet_distance_is_exact():
    """Per-class FID has fewer samples than feature dimensions: the nuclear-norm form equals the matrix square
    root's value, at a fraction of the cost."""
    import numpy as np

    from ganforge.tasks.metrics import feature_stats, frechet_distance, frechet_distance_features

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 30)), rng.normal(1, 2, size=(13, 30))
    assert frechet_distance_features(a, b) == pytest.approx(frechet_distance(*feature_stats(a), *feature_stats(b)),
                                                            rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance_features(a[:1], b)
