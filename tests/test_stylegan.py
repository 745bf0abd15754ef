"""StyleGAN and StyleGAN2: demodulation, style mixing, truncation toward w_avg, lazy regularizers and their
scaling, progressive v1 stages with fade-in, fine-tuning from another resolution, the conditional StyleGAN2,
the figures and `ganforge stylemix`, and the refusals. Exact resume (the path-length mean in the family state
included) is tests/test_family_contract.py's; the killed worker is in test_train_ray.py; StyleGAN2's Prefect
flow and `dvc repro` runs in test_pipeline.py and test_dvc.py (StyleGAN v1's chaining is ProGAN's, run there)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from ganforge.models.families import get_family
from ganforge.models.family import StepContext
from ganforge.models.nn.style import modulated_conv2d
from ganforge.tasks.checkpoint import load_generator, load_state
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import ParamsError, TrainParams, load_params

SG2 = dict(channel_base=128, channel_max=16, latent_dim=8, w_dim=8, mapping_layers=2)
SG1 = dict(fmap_base=64, fmap_max=16, fmap_min=4, latent_dim=8, w_dim=8, mapping_layers=2)


def _train(family: str, resolution: int = 16, **section) -> TrainParams:
    base = SG2 if family.startswith("stylegan2") else SG1
    return TrainParams.model_validate(dict(family=family, resolution=resolution, batch_size=8, checkpoint_kimg=0.5,
                                           log_every=1, grid_size=3, **{family: {**base, **section}}))


def _config(p: TrainParams, shards, **kw) -> dict:
    return {"params": p.model_dump(mode="json"), "stage": len(get_family(p).stages()) - 1, "shards": str(shards),
            "run_dir": None, **kw}


def _ctx(step: int, images: int = 0) -> StepContext:
    return StepContext(step, images, torch.Generator().manual_seed(step), torch.device("cpu"), contextlib.nullcontext,
                       lambda m: contextlib.nullcontext())


def _trained(tmp_path, shards, family="stylegan2", steps=2, **section):
    """A checkpoint of a few steps, loaded back as a user would: (family, stage, EMA modules, path)."""
    p = _train(family, **section)
    s = LocalSession(tmp_path / family)
    run_stage(_config(p, shards, max_steps=steps), s)
    fam, stage, ema, _ = load_generator(s.checkpoints[-1])
    return fam, stage, ema, s.checkpoints[-1]


def test_demodulation_keeps_unit_scale_for_random_styles():
    torch.manual_seed(0)
    x = torch.randn(16, 32, 48, 48)
    w = torch.randn(24, 32, 1, 1)
    styles = torch.randn(16, 32).exp()  # log-normal: far from 1, different per sample
    y = modulated_conv2d(x, w, styles, demodulate=True)
    per = y.std(dim=(2, 3))  # one std per sample and output channel
    assert float(per.mean()) == pytest.approx(1.0, abs=0.02) and float(per.min()) > 0.85 and float(per.max()) < 1.15
    raw = modulated_conv2d(x, w, styles, demodulate=False).std(dim=(2, 3))
    assert float(raw.max() / raw.min()) > 5  # without demodulation the scale follows the styles
    # the non-fused form equals the per-sample modulated, demodulated weight
    wi = w[None] * styles[:, None, :, None, None]
    wi = wi * (wi.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    ref = torch.stack([torch.nn.functional.conv2d(x[i:i + 1], wi[i])[0] for i in range(16)])
    assert torch.allclose(y, ref, atol=1e-4)


@pytest.mark.parametrize("family", ["stylegan2", "stylegan"])
def test_style_mixing_takes_coarse_styles_from_a_and_fine_from_b(family):
    """Every layer's style input is captured: with crossover k, layers < k get exactly what they get from latent
    A alone, layers >= k what they get from B alone; with k = num_ws the image is A's."""
    fam = get_family(_train(family))
    stage = fam.stages()[-1]
    G = fam.build(stage)["G"].eval()
    n = G.num_ws
    za, zb = torch.randn(2, 8), torch.randn(2, 8)
    affines = [m.affine for m in G.modules() if hasattr(m, "affine") and m is not G]
    seen: list[torch.Tensor] = []
    for a in affines:
        a.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))

    def styles_reaching_layers(**kw):
        seen.clear()
        with torch.no_grad():
            img = G(noise="const", **kw)
        return list(seen), img

    coded, _ = styles_reaching_layers(ws=torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, 8))
    order = [int(t[0, 0]) for t in coded]  # the style index each styled layer reads, in execution order
    assert sorted(set(order)) == list(range(n)) and len(order) == len(affines)
    a_in, a_img = styles_reaching_layers(z=za)
    b_in, b_img = styles_reaching_layers(z=zb)
    k = 3
    m_in, m_img = styles_reaching_layers(z=za, z2=zb, cutoff=k)
    with torch.no_grad():
        wa, wb = G.mapping(za), G.mapping(zb)
    assert all(torch.equal(t, wa) for t in a_in) and all(torch.equal(t, wb) for t in b_in)
    for got, i in zip(m_in, order):
        assert torch.equal(got, wa if i < k else wb), i
    assert not torch.allclose(m_img, a_img) and not torch.allclose(m_img, b_img)
    _, full = styles_reaching_layers(z=za, z2=zb, cutoff=n)
    assert torch.equal(full, a_img)


@pytest.mark.parametrize("family", ["stylegan2", "stylegan"])
def test_psi_zero_is_the_w_avg_image_for_every_seed(family):
    fam = get_family(_train(family))
    stage = fam.stages()[-1]
    G = fam.build(stage)["G"].eval()
    with torch.no_grad():
        G.mapping(torch.randn(64, 8), update_w_avg=True)  # a tracked mean away from 0
        G.mapping.w_avg.mul_(100)
    ema = {"G": G}
    zero = fam.sample(ema, stage, [1, 2, 3], truncation=0.0)
    w_avg_img = G(ws=G.mapping.w_avg.expand(1, G.num_ws, -1), noise="const").clamp(-1, 1)
    for img in zero:
        assert torch.allclose(img, w_avg_img[0], atol=1e-5)
    one = fam.sample(ema, stage, [1, 2, 3], truncation=None)
    assert not torch.allclose(one[0], one[1])
    half = fam.sample(ema, stage, [1], truncation=0.5)
    assert not torch.allclose(half[0], zero[0]) and not torch.allclose(half[0], one[0])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"truncation psi must be in \[0, 1\]"):
            fam.sample(ema, stage, [1], truncation=bad)
    fam.p.truncation_cutoff = 2  # only styles 0-1 move: the others keep each seed's own
    cut = fam.sample(ema, stage, [1, 2], truncation=0.0)
    assert not torch.allclose(cut[0], cut[1])
    ws, own = fam.seed_styles(ema, stage, [1, 2], psi=0.0), fam.seed_styles(ema, stage, [1, 2])
    assert torch.equal(ws[:, :2], G.mapping.w_avg.expand(2, 2, -1)) and torch.equal(ws[:, 2:], own[:, 2:])


def test_lazy_regularizers_run_on_their_intervals_scaled_by_them():
    p = _train("stylegan2", r1_interval=4, pl_interval=2, r1_gamma=2.0)
    fam = get_family(p)
    stage = fam.stages()[0]
    mods = fam.build(stage)
    opts = fam.optimizers(mods)
    assert opts["G"].param_groups[0]["lr"] == pytest.approx(0.0025 * 2 / 3)  # c = k / (k + 1)
    assert opts["D"].param_groups[0]["lr"] == pytest.approx(0.0025 * 4 / 5)
    assert opts["D"].param_groups[0]["betas"][1] == pytest.approx(0.99 ** 0.8)
    batch = {"image": torch.rand(8, 3, 16, 16) * 2 - 1, "label": torch.full((8,), -1)}
    pl_means = []
    for step in range(6):
        out = fam.train_step(mods, opts, batch, stage, _ctx(step))
        assert ("loss_r1" in out) == (step % 4 == 0) and ("loss_pl" in out) == (step % 2 == 0), (step, out)
        if "loss_r1" in out:
            assert out["loss_r1"] == pytest.approx(out["r1_penalty"] * 2.0 / 2 * 4, rel=1e-5)
        if "loss_pl" in out:
            assert out["loss_pl"] == pytest.approx(out["pl_penalty"] * 2.0 * 2, rel=1e-5)
        pl_means.append(out["pl_mean"])
    assert pl_means[0] > 0 and pl_means[1] == pl_means[0] and pl_means[2] != pl_means[1]  # updated on PL steps only
    # the EMA half-life ramps up: 5% of the images seen, up to train.ema_half_life_kimg
    assert fam.ema_half_life(stage, 1000, 10_000) == pytest.approx(50)
    assert fam.ema_half_life(stage, 10**7, 10_000) == 10_000
    assert fam.r1_gamma() == 2.0 and get_family(_train("stylegan2")).r1_gamma() == pytest.approx(0.0002 * 256 / 8)


def test_stylegan_v1_stages_chain_4_8_16_with_fade_in(digits_shards, tmp_path):
    p = _train("stylegan", transition_kimg=0.064, stabilize_kimg=0.032)
    fam = get_family(p)
    assert [(s.name, s.resolution, s.info["transition_kimg"]) for s in fam.stages()] == [
        ("stylegan-r0004", 4, 0.0), ("stylegan-r0008", 8, 0.064), ("stylegan-r0016", 16, 0.064)]
    init, alphas = None, {}
    for st in fam.stages():
        s = LocalSession(tmp_path / st.name)
        run_stage({**_config(p, digits_shards), "stage": st.index, "init": init}, s)
        alphas[st.name] = [r["alpha"] for r in s.reports]
        if init is not None:  # grown from the previous stage: its mapping network and lower blocks carried over
            prev = load_state(init)["modules"]
            mods = fam.build(st)
            fam.grow(mods, prev)
            now = mods["G"].state_dict()
            assert set(prev["G"]) - set(now) <= {k for k in prev["G"] if k.startswith("to_rgb.")}
            for k in ("mapping.fcs.0.weight", "mapping.w_avg", "const", "blocks.4.1.conv.weight",
                      f"blocks.{st.resolution // 2}.1.adain.affine.weight"):
                assert torch.equal(now[k], prev["G"][k]), k
            assert torch.equal(mods["D"].state_dict()["conv4.weight"], prev["D"]["conv4.weight"])
        init = s.checkpoints[-1]
        assert load_state(init)["resolution"] == st.resolution
    for name in ("stylegan-r0008", "stylegan-r0016"):
        a = alphas[name]
        assert a[0] < 0.2 and a[-1] == 1.0 and a == sorted(a) and any(0.3 < x < 0.9 for x in a)
    assert set(alphas["stylegan-r0004"]) == {1.0}
    fam16, stage, ema, _ = load_generator(init)
    assert fam16.sample(ema, stage, [0, 1]).shape == (2, 3, 16, 16)


def test_stylegan2_fine_tunes_from_a_lower_resolution_checkpoint(digits_shards, tmp_path):
    """A 16px stage started from an 8px checkpoint (``ganforge train --init``): every tensor whose name and shape
    match is taken over; the 16px block and its toRGB/fromRGB keep their init."""
    low = LocalSession(tmp_path / "low")
    run_stage(_config(_train("stylegan2", resolution=8), digits_shards, max_steps=2), low)
    p16 = _train("stylegan2", resolution=16)
    high = LocalSession(tmp_path / "high")
    run_stage(_config(p16, digits_shards, max_steps=1, init=low.checkpoints[-1]), high)
    assert load_state(high.checkpoints[-1])["resolution"] == 16
    before = load_state(low.checkpoints[-1])["modules"]
    fam = get_family(p16)
    mods = fam.build(fam.stages()[0])
    fresh = {k: v.clone() for k, v in mods["G"].state_dict().items()}
    fresh_d = {k: v.clone() for k, v in mods["D"].state_dict().items()}
    fam.grow(mods, before)
    got = mods["G"].state_dict()
    for k in ("mapping.fcs.0.weight", "mapping.w_avg", "const", "conv1.8.weight", "to_rgb.8.affine.weight"):
        assert torch.equal(got[k], before["G"][k]), k
    assert "conv1.16.weight" not in before["G"] and torch.equal(got["conv1.16.weight"], fresh["conv1.16.weight"])
    d = mods["D"].state_dict()
    assert torch.equal(d["blocks.8.conv0.weight"], before["D"]["blocks.8.conv0.weight"])
    assert "from_rgb.16.weight" not in before["D"] and torch.equal(d["from_rgb.16.weight"], fresh_d["from_rgb.16.weight"])


def test_conditional_stylegan2_reads_labels_in_g_and_d(digits_shards, tmp_path):
    fam, stage, ema, _ = _trained(tmp_path, digits_shards, conditional=True, steps=2)
    assert fam.num_classes == 10
    same_seed = fam.sample(ema, stage, [5, 5], labels=[0, 1])
    assert not torch.allclose(same_seed[0], same_seed[1])
    seeds = list(range(9))
    grid = fam.grid(ema, stage, seeds, lambda: None)
    for i in range(9):  # one row per class
        assert torch.allclose(grid[i], fam.sample(ema, stage, [seeds[i]], labels=[i // 3])[0], atol=1e-5)
    D = fam.build(stage)["D"]
    x = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(D(x, torch.tensor([0, 1, 2, 3])), D(x, torch.tensor([4, 5, 6, 7])))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fam.sample(ema, stage, [1], labels=[10])


def test_figures_and_stylemix_of_a_checkpoint(digits_shards, tmp_path, monkeypatch):
    from ganforge.flows.cli import main
    from ganforge.tasks.figures import write_figures

    fam, stage, ema, ckpt = _trained(tmp_path, digits_shards)
    assert float(load_state(ckpt)["modules"]["G"]["mapping.w_avg"].abs().sum()) > 0  # tracked in training, saved
    rows, cols = [0, 1], [7, 8, 9]
    imgs, nrow = fam.style_mix(ema, stage, rows, cols, "0-1")
    assert nrow == 4 and imgs.shape[0] == 3 * 4
    ws_r, ws_c = fam.seed_styles(ema, stage, rows), fam.seed_styles(ema, stage, cols)
    mixed = ws_r[1:2].clone()
    mixed[:, :2] = ws_c[2:3, :2]
    assert torch.allclose(imgs[2 * 4 + 3], fam.synthesize(ema["G"], mixed, stage)[0].clamp(-1, 1), atol=1e-5)
    assert torch.allclose(imgs[4 + 0], fam.sample(ema, stage, [0])[0], atol=1e-5)  # row source = its sample
    assert fam.layer_range("coarse", stage) == range(0, 3) and fam.layer_range("middle", stage) == range(3, 6)
    pngs = write_figures(ckpt, tmp_path / "fig", list(range(12)))
    assert sorted(p.name.split("-", 2)[2] for p in pngs) == ["interpolation.png", "stylemix-coarse.png",
                                                             "stylemix-middle.png", "truncation.png"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mix.png"
    assert main(["-q", "stylemix", "--model", ckpt, "--rows", "0-2", "--cols", "4,5", "--layers", "middle",
                 "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert (w, h) == (3 * 33 + 1, 4 * 33 + 1)  # 3 columns (corner + 2 sources) x 4 rows, 32px tiles + padding
    assert main(["-q", "stylemix", "--model", ckpt, "--layers", "fine", "--out", str(out)]) == 4
    assert main(["-q", "stylemix", "--model", ckpt, "--layers", "2-6", "--out", str(out)]) == 4
    assert main(["-q", "stylemix", "--model", ckpt, "--rows", "a", "--out", str(out)]) == 2
    assert main(["-q", "stylemix", "--model", ckpt, "--rows", "3-1", "--out", str(out)]) == 2
    assert main(["-q", "stylemix", "--model", ckpt, "--truncation", "2", "--out", str(out)]) == 4


def test_refusals_name_the_key_or_the_family(digits_shards, tmp_path, monkeypatch, capsys):
    from ganforge.flows.cli import main

    with pytest.raises(ParamsError, match=r"train.stylegan2.channel_base \(8\) gives no channels at "
                                          r"train.resolution 16px"):
        load_params(None, {"train.family": "stylegan2", "train.resolution": 16, "train.stylegan2.channel_base": 8})
    with pytest.raises(ParamsError, match=r"train.stylegan2.truncation_cutoff \(9\) is beyond the 6 styles"):
        load_params(None, {"train.family": "stylegan2", "train.resolution": 16, "train.stylegan2.truncation_cutoff": 9})
    with pytest.raises(ParamsError, match=r"train.stylegan.truncation_cutoff \(7\) is beyond the 6 styles"):
        load_params(None, {"train.family": "stylegan", "train.resolution": 16, "train.stylegan.truncation_cutoff": 7})
    with pytest.raises(ParamsError, match="style_mixing_prob"):
        load_params(None, {"train.stylegan2.style_mixing_prob": 1.5})
    p = TrainParams.model_validate(dict(family="dcgan", resolution=8, batch_size=8, checkpoint_kimg=1,
                                        dcgan=dict(width=8, latent_dim=8)))
    s = LocalSession(tmp_path / "dcgan")
    run_stage({"params": p.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None,
               "max_steps": 1}, s)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["-q", "stylemix", "--model", s.checkpoints[-1], "--out", str(tmp_path / "x.png")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a StyleGAN or StyleGAN2 model" in err[0] and "family dcgan" in err[0]
    assert not (tmp_path / "x.png").exists()
