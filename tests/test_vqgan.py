"""VQ-GAN: quantizer gradients and loss weights, codebook statistics and restarts, the GPT prior
(overfitting, KV cache, filtering, sliding window), params, and a 2-worker Ray run of all three
stages on real digits (reconstructions, token shards, prior samples, resume after a worker death,
evaluation, registry)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from ganforge.models.nn.gpt import GPT, adamw_param_groups, cosine_lr, draw, filter_logits, sample
from ganforge.models.nn.lpips import load_lpips
from ganforge.models.families.vqgan import VQGAN, L2VectorQuantizer, VectorQuantizer, ViTVQModel, codebook_stats
from ganforge.tasks.errors import CheckpointError
from ganforge.tasks.params import Params, ParamsError, TrainParams, load_params

TINY = dict(ch=8, ch_mult=[1, 2, 2], z_channels=8, embed_dim=8, n_embed=32, disc_start=4, disc_ch=8, disc_layers=2,
            restart_every=5, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, autoencoder_kimg=0.16, prior_kimg=0.16)
TINY_VIT = {**TINY, "tokenizer": "vit", "patch_size": 4, "vit_dim": 16, "vit_depth": 1, "vit_heads": 2,
            "lookup_dim": 4}  # the same 4x4 code grid at 16px as TINY's conv tokenizer


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("legacy", [False, True])
def test_quantizer_straight_through_and_loss_weights(legacy):
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=6, embed_dim=3, beta=0.25, legacy=legacy)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    zq, loss, info = q(z)
    e = q.lookup(info["indices"]).detach()
    # forward value: the nearest codes
    d = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - q.embedding.weight.detach()) ** 2).sum(-1)
    assert torch.equal(info["indices"], d.argmin(-1))
    assert torch.allclose(zq, e)
    # straight-through: the gradient of a loss on zq reaches z unchanged
    g = torch.randn_like(zq)
    (gz,) = torch.autograd.grad((zq * g).sum(), z, retain_graph=True)
    assert torch.allclose(gz, g)
    # loss = ||sg[z]-e||^2 + beta ||z - sg[e]||^2: codebook gets weight 1, the encoder beta (legacy: swapped)
    (gz, ge) = torch.autograd.grad(loss, (z, q.embedding.weight))
    n = z.numel()
    w_codebook, w_commit = (0.25, 1.0) if legacy else (1.0, 0.25)
    assert torch.allclose(gz, w_commit * 2 * (z - e).detach() / n, atol=1e-6)
    expect_ge = torch.zeros_like(q.embedding.weight)
    flat_diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    expect_ge.index_add_(0, info["indices"].reshape(-1), w_codebook * 2 * flat_diff / n)
    assert torch.allclose(ge, expect_ge, atol=1e-6)


def test_l2_lookup_picks_the_code_of_largest_cosine_similarity():
    torch.manual_seed(0)
    q = L2VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    cos = torch.nn.functional.cosine_similarity(flat[:, None], q.embedding.weight[None], dim=-1)
    assert torch.equal(q.codes(z).reshape(-1), cos.argmax(1))
    assert torch.equal(q.codes(7.5 * z), q.codes(z))  # only directions count
    # a long code beside the input and a short one in its direction: Euclidean and cosine lookups disagree
    with torch.no_grad():
        q.embedding.weight[:2] = torch.tensor([[0.1, 0.08, 0.0, 0.0], [2.0, 1.2, 0.0, 0.0]])
        q.embedding.weight[2:] = -10.0
    x = torch.tensor([1.5, 1.5, 0.0, 0.0])[None, :, None, None]
    assert int(q.codes(x)) == 0 and int(VectorQuantizer.codes(q, x)) == 1
    zq, loss, info = q(x)  # the VQ terms between the normalized vectors; the output is the unit code (s-t)
    unit = torch.nn.functional.normalize(torch.tensor([0.1, 0.08, 0.0, 0.0]), dim=0)
    assert torch.allclose(zq.flatten(), unit, atol=1e-6)
    expected = ((unit - torch.tensor([2 ** -0.5, 2 ** -0.5, 0, 0])) ** 2).mean().item()
    assert float(info["codebook_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(1.25 * expected, rel=1e-5)  # codebook + 0.25 commitment
    assert torch.allclose(q.lookup(torch.tensor([[[1]]])).norm(dim=1), torch.ones(1))


def test_codebook_stats_counts_and_perplexity():
    idx = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    st = codebook_stats(idx, 8)
    assert st["codebook_usage"] == pytest.approx(4 / 8)
    assert st["perplexity"] == pytest.approx(4.0)  # uniform over 4 codes
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)


def test_dead_codes_are_restarted_onto_encoder_outputs():
    from ganforge.models.family import StepContext

    fam = VQGAN(TrainParams(family="vqgan", resolution=16, vqgan=TINY))
    q = VectorQuantizer(8, 2)
    before = q.embedding.weight.detach().clone()
    ctx = StepContext(0, 0, torch.Generator().manual_seed(0), torch.device("cpu"), None, None)
    assert fam._restart_dead_codes(q, torch.tensor([1, 1, 3]), None, ctx) == 0  # counting only
    assert q.usage.tolist() == [0, 2, 0, 1, 0, 0, 0, 0]
    z = torch.full((1, 2, 2, 2), 5.0)
    assert fam._restart_dead_codes(q, torch.tensor([1]), z, ctx) == 6
    w = q.embedding.weight.detach()
    assert torch.equal(w[[1, 3]], before[[1, 3]])  # used codes kept
    assert torch.all(w[[0, 2, 4, 5, 6, 7]] == 5.0)  # dead ones moved onto encoder outputs
    assert q.usage.sum() == 0  # a new window starts


@pytest.mark.parametrize("tokenizer", ["conv", "vit"])
def test_token_round_trip_is_stable_once_the_autoencoder_has_learned(tokenizer):
    """encode -> decode -> encode gives back (nearly) the same codes: tokens describe images the decoder makes."""
    from sklearn.datasets import load_digits

    from ganforge.models.families.vqgan import VQModel

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 8 - 1
    if tokenizer == "conv":
        vq = VQModel(16, [1, 2], 1, 8, 8, 32, 0.25, False, False)
    else:  # 2x2 patches of the 8x8 digits: the same 4x4 grid
        x = x.clamp(-1, 1)
        vq = ViTVQModel(8, 2, 32, 1, 2, 2.0, 8, 32, 0.25, False)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    first = None
    for _ in range(300):
        rec, qloss, _ = vq(x)
        l1 = (rec - x).abs().mean()
        first = first if first is not None else l1.item()
        opt.zero_grad()
        (l1 + qloss).backward()
        opt.step()
    assert l1.item() < (0.1 if tokenizer == "conv" else 0.25) * first
    with torch.no_grad():
        idx = vq.encode_codes(x)
        again = vq.encode_codes(vq.decode_codes(idx))
    assert (again == idx).float().mean() > 0.85


# ----------------------------------------------------------------------------- prior


def test_gpt_overfits_a_tiny_token_set_and_samples_it_back():
    torch.manual_seed(0)
    data = torch.randint(0, 16, (4, 9))  # 4 grids of 3x3 codes
    gpt = GPT(vocab=16, block_size=9, n_layer=2, n_head=2, n_embd=32, n_classes=4)
    opt = torch.optim.AdamW(adamw_param_groups(gpt, 0.0), lr=3e-3)
    cond = torch.arange(4)
    for _ in range(150):
        logits = gpt(data[:, :-1], cond)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), data.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    gpt.eval()
    out = sample(gpt, cond, (3, 3), torch.full((4, 9), 0.5), top_k=1)
    assert torch.equal(out.reshape(4, 9), data)  # class c's start token reproduces grid c


def test_kv_cache_gives_the_same_samples_and_logits():
    torch.manual_seed(1)
    gpt = GPT(vocab=20, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    cond = torch.zeros(3, dtype=torch.long)
    u = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    a = sample(gpt, cond, (3, 4), u, use_cache=True)
    b = sample(gpt, cond, (3, 4), u, use_cache=False)
    assert torch.equal(a, b)
    seq = a.reshape(3, -1)
    caches = [{} for _ in gpt.blocks]
    step = [gpt(None, cond, caches, pos=0)[:, -1]] + [gpt(seq[:, i - 1 : i], cond, caches, pos=i)[:, -1] for i in range(1, 12)]
    assert torch.allclose(torch.stack(step, 1), gpt(seq[:, :-1], cond), atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        gpt(torch.zeros(1, 12, dtype=torch.long), cond[:1])


def test_filtering_temperature_top_k_top_p_and_inverse_cdf_draw():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(filter_logits(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)
    assert torch.allclose(filter_logits(logits, top_k=2), torch.tensor([[0.625, 0.375, 0, 0]]), atol=1e-6)
    # nucleus 0.7: 0.5 alone is < 0.7, so 0.3 joins; 0.15 is dropped (0.8 >= 0.7 already)
    assert torch.allclose(filter_logits(logits, top_p=0.7), torch.tensor([[0.625, 0.375, 0, 0]]), atol=1e-6)
    assert torch.allclose(filter_logits(logits, top_p=0.1), torch.tensor([[1.0, 0, 0, 0]]))
    cold = filter_logits(logits, temperature=0.01)
    assert cold[0, 0] > 0.999
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4, 1)
    assert draw(p, torch.tensor([0.1, 0.6, 0.85, 0.99])).tolist() == [0, 1, 2, 3]


def test_sliding_window_samples_grids_larger_than_the_context():
    torch.manual_seed(2)
    gpt = GPT(vocab=10, block_size=9, n_layer=1, n_head=2, n_embd=16).eval()
    cond = torch.zeros(2, dtype=torch.long)
    out = sample(gpt, cond, (5, 6), torch.rand(2, 30), train_grid=(3, 3))
    assert out.shape == (2, 5, 6) and out.min() >= 0 and out.max() < 10
    with pytest.raises(ValueError, match="context"):
        sample(gpt, cond, (5, 6), torch.rand(2, 30))
    with pytest.raises(ValueError, match="one uniform per token"):
        sample(gpt, cond, (3, 3), torch.rand(2, 8))


def test_adamw_decays_linear_weights_only_and_cosine_schedule():
    gpt = GPT(vocab=10, block_size=4, n_layer=1, n_head=1, n_embd=8)
    decay, no_decay = adamw_param_groups(gpt, 0.1)
    linear_weights = {id(m.weight) for m in gpt.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights and decay["weight_decay"] == 0.1
    assert id(gpt.pos_emb) in {id(p) for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 1.0, warmup=10) == pytest.approx(0.1 + 0.9 * 0.5)


# ----------------------------------------------------------------------------- params, perceptual loss


def test_vqgan_params_are_validated():
    with pytest.raises(ParamsError, match="n_embd"):
        load_params(None, {"train.family": "vqgan", "train.vqgan.n_embd": 30, "train.vqgan.n_head": 4})
    with pytest.raises(ParamsError, match="downsamples by 16"):
        load_params(None, {"train.family": "vqgan", "train.resolution": 16, "train.vqgan.ch_mult": [1, 1, 1, 1, 1]})
    with pytest.raises(ParamsError, match="disc_layers=2 is too deep for 8px"):
        load_params(None, {"train.family": "vqgan", "train.resolution": 8, "train.vqgan.ch_mult": [1, 2]})
    with pytest.raises(ParamsError, match="train.family"):
        load_params(None, {"train.family": "vqgan2"})
    with pytest.raises(ParamsError, match="patch_size 5 must divide train.resolution 16"):
        load_params(None, {"train.family": "vqgan", "train.resolution": 16, "train.vqgan.tokenizer": "vit",
                           "train.vqgan.patch_size": 5})
    with pytest.raises(ParamsError, match=r"vit_dim \(30\) must be divisible by vit_heads \(4\)"):
        load_params(None, {"train.family": "vqgan", "train.vqgan.vit_dim": 30})
    vit = VQGAN(TrainParams(family="vqgan", resolution=32, vqgan={"tokenizer": "vit", "patch_size": 8}))
    assert vit.grid_hw == 4 and vit.n_tokens == 16 and vit.rec_loss == "l2"
    assert "vit: 4x4 tokens of 8x8 patches" in vit.notes(vit.stages()[0])["tokenizer"]
    stages = VQGAN(TrainParams(family="vqgan", resolution=32)).stages()
    assert [(s.name, s.kind) for s in stages] == [
        ("vqgan-1-autoencoder", "train"), ("vqgan-2-tokens", "prepare"), ("vqgan-3-prior", "train")]


def test_perceptual_loss_off_without_weights_is_said(tmp_path, caplog):
    assert load_lpips(None, None)[0] is None
    lp, reason = load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    assert lp is None and "does not exist" in reason
    fam = VQGAN(TrainParams(family="vqgan", resolution=16, vqgan={**TINY, "lpips_vgg_path": str(tmp_path / "x.pth"),
                                                                   "lpips_lin_path": str(tmp_path / "y.pth")}))
    with caplog.at_level(logging.WARNING, logger="ganforge.vqgan"):
        notes = fam.notes(fam.stages()[0])
    assert notes["perceptual_loss"].startswith("disabled") and "x.pth" in notes["perceptual_loss"]
    assert any("perceptual loss disabled" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_vqgan_three_stages_on_two_ray_workers(digits_shards, tmp_path, local_ray):
    from ganforge.tasks.data import TokenStream
    from ganforge.tasks.evaluate import evaluate
    from ganforge.tasks.prepare import prepare
    from ganforge.tasks.checkpoint import load_generator
    from ganforge.tasks.train import train

    run = tmp_path / "run"
    marker = tmp_path / "killed"
    # vqgan_faulty (tests/plugins) is VQ-GAN that kills one worker once: here rank 1 of the prior at step 7
    params = Params.model_validate({
        "train": dict(family="vqgan_faulty", out=str(run), resolution=16, workers=2, batch_size=16,
                      checkpoint_kimg=0.08, log_every=5, grid_size=4, max_failures=1,
                      vqgan_faulty={**TINY, "prior_classes": 10, "fail_stage": "vqgan-3-prior", "fail_step": 7,
                                    "fail_rank": 1, "fail_marker": str(marker)}),
        "eval": dict(num_samples=20, workers=2, kid_subsets=3, kid_subset_size=10, cache_dir=str(tmp_path / "cache")),
    })
    summary = train(digits_shards, run, params)
    assert marker.exists()  # a worker of the prior stage died ...
    st = summary["stages"]
    assert list(st) == ["vqgan-1-autoencoder", "vqgan-2-tokens", "vqgan-3-prior"]
    assert all(r["done"] for r in st.values())
    assert st["vqgan-3-prior"]["images_seen"] == 160  # ... and the stage still finished its images
    hist = [json.loads(x) for x in (run / "metrics" / "vqgan-3-prior.jsonl").read_text().splitlines()]
    assert hist[-1]["loss_prior"] < math.log(32)  # below a uniform guess over the codebook
    ae_hist = [json.loads(x) for x in (run / "metrics" / "vqgan-1-autoencoder.jsonl").read_text().splitlines()]
    assert ae_hist[-1]["l1"] < ae_hist[0]["l1"] and "loss_d" in ae_hist[-1]  # learning; GAN on after disc_start
    assert "disabled" in st["vqgan-1-autoencoder"]["notes"]["perceptual_loss"]

    # reconstructions grid (inputs / reconstructions rows) and prior samples grid
    assert (run / "stages" / "vqgan-1-autoencoder" / "grid.png").exists()
    assert (run / "stages" / "vqgan-3-prior" / "grid.png").exists()

    # token shards: manifest, determinism (1 in-process worker == 2 Ray workers, byte for byte)
    tok = json.loads((run / "tokens" / "manifest.json").read_text())
    assert tok["kind"] == "tokens" and tok["grid"] == [4, 4] and tok["codebook_size"] == 32
    assert tok["splits"]["train"]["count"] + tok["splits"]["val"]["count"] == 1797
    assert 0 < tok["splits"]["train"]["codebook_usage"] <= 1
    ae_ckpt = st["vqgan-1-autoencoder"]["checkpoint"]
    again = prepare(ae_ckpt, 1, digits_shards, tmp_path / "tokens1", workers=1, progress=False)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in tok["splits"]["train"]["shards"]]
    codes, labels = next(iter(TokenStream(run / "tokens", 16, 8)))
    assert codes.shape == (8, 4, 4) and codes.dtype == torch.int64 and labels.min() >= 0

    # the token path (codes -> decoder) is exactly the model's reconstruction path
    fam, stage, ema, _ = load_generator(ae_ckpt)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ema["VQ"].decode_codes(ema["VQ"].encode_codes(x)), ema["VQ"](x)[0], atol=1e-5)

    # the prior stage samples images by itself, deterministically per latent; evaluation
    fam, stage, ema, _ = load_generator(st["vqgan-3-prior"]["checkpoint"])
    z = torch.randn(3, fam.latent_dim, generator=torch.Generator().manual_seed(0))
    a = fam.generate(ema, z, stage)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, fam.generate(ema, z, stage))
    assert torch.allclose(fam.generate(ema, z[:1], stage), a[:1], atol=1e-4)  # batch-independent
    res = evaluate(st["vqgan-3-prior"]["checkpoint"], digits_shards, params.eval, out=tmp_path / "eval", progress=False)
    assert res["fid"] > 0 and res["rfid"] > 0 and 0 < res["codebook_usage"] <= 1 and res["family"] == "vqgan_faulty"
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"fid", "kid", "rfid", "codebook_usage"} <= set(saved)
    with pytest.raises(ValueError, match="no sampler"):
        fam2, stage2, ema2, _ = load_generator(ae_ckpt)
        fam2.generate(ema2, torch.randn(1, fam2.latent_dim), stage2)

    # a re-run skips the trained stages and re-checks the tokens without re-encoding
    before = (run / "tokens" / "manifest.json").stat().st_mtime_ns
    train(digits_shards, run, params)
    assert (run / "tokens" / "manifest.json").stat().st_mtime_ns == before


def test_token_stage_refuses_bad_input(digits_shards, tmp_path):
    from ganforge.tasks.prepare import prepare

    with pytest.raises(FileNotFoundError, match="state.pt"):
        prepare(tmp_path / "nope", 1, digits_shards, tmp_path / "t", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="manifest"):
        prepare(tmp_path / "nope", 1, tmp_path, tmp_path / "t", workers=1, progress=False)
    assert not (tmp_path / "t").exists()
    assert Path(digits_shards, "manifest.json").exists()


@pytest.mark.parametrize("tiny", [TINY, TINY_VIT], ids=["conv", "vit"])
def test_prior_stage_keeps_the_autoencoder_that_made_its_tokens(tiny, digits_shards, tmp_path):
    """With EMA on, the tokens come from the autoencoder's EMA weights; the prior stage must decode with exactly
    those (its frozen copy is neither trained nor pulled towards anything), in-process (LocalSession). The
    tokens stage is the same for both tokenizers: it only calls encode_codes."""
    from ganforge.tasks.checkpoint import load_state
    from ganforge.tasks.loop import LocalSession, run_stage
    from ganforge.tasks.prepare import prepare

    tp = TrainParams(family="vqgan", resolution=16, batch_size=8, checkpoint_kimg=1.0, grid_size=2,
                     ema_half_life_kimg=0.01, vqgan={**tiny, "ema": True, "autoencoder_kimg": 0.04, "prior_kimg": 0.04})
    cfg = {"params": tp.model_dump(mode="json"), "shards": str(digits_shards), "run_dir": None}
    ae = LocalSession(tmp_path / "ae", device="cpu")
    run_stage({**cfg, "stage": 0}, ae)
    ae_state = load_state(ae.checkpoints[-1])
    last = "decoder.conv_out.weight" if tiny is TINY else "decoder.to_pixels.weight"
    assert not torch.equal(ae_state["ema"]["VQ"][last], ae_state["modules"]["VQ"][last])
    tok = prepare(ae.checkpoints[-1], 1, digits_shards, tmp_path / "tokens", workers=1, progress=False)
    assert tok["grid"] == [4, 4] and tok["codebook_size"] == 32
    prior = LocalSession(tmp_path / "prior", device="cpu")
    run_stage({**cfg, "stage": 2, "shards": str(tmp_path / "tokens"), "init": ae.checkpoints[-1]}, prior)
    st = load_state(prior.checkpoints[-1])
    for k, v in ae_state["ema"]["VQ"].items():
        assert torch.equal(st["ema"]["VQ"][k], v), k
    assert not torch.equal(st["ema"]["GPT"]["head.weight"], st["modules"]["GPT"]["head.weight"])  # EMA of the GPT


def test_vqgan_stages_refuse_bad_input(digits_shards, tmp_path):
    """Missing tokens, missing labels for a class-conditional prior, an autoencoder asked for samples: clear errors."""
    from ganforge.models.family import StepContext
    from ganforge.tasks.train import train_stage

    p = Params.model_validate({"train": dict(family="vqgan", out=str(tmp_path / "run"), resolution=16, vqgan=TINY)})
    with pytest.raises(ValueError, match="needs stage vqgan-2-tokens to have finished first"):
        train_stage(digits_shards, p.train.out, p, 2)
    with pytest.raises(FileNotFoundError, match="has no state.pt"):
        train_stage(digits_shards, p.train.out, p, 2, init=str(tmp_path))
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"initial checkpoint .*/ae \(the previous stage's\) is damaged"):
        train_stage(digits_shards, p.train.out, p, 2, init=str(tmp_path / "ae"))
    from ganforge.tasks.loop import LocalSession, run_stage

    ae = LocalSession(tmp_path / "ae-ok")
    run_stage({"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None,
               "max_steps": 1}, ae)
    with pytest.raises(FileNotFoundError, match="trains on tokens, but .* has none"):
        train_stage(digits_shards, p.train.out, p, 2, init=ae.checkpoints[-1])  # the tokens stage never ran
    fam = VQGAN(TrainParams(family="vqgan", resolution=16, vqgan={**TINY, "prior_classes": 10}))
    ctx = StepContext(0, 0, torch.Generator(), torch.device("cpu"), None, None)
    with pytest.raises(ValueError, match="prior_classes=10 needs every sample to have a label"):
        fam._prior_step({}, {"GPT": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)},
                        torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([3, -1]), fam.stages()[2], ctx)
