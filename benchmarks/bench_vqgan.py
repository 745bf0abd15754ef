"""VQ-GAN benchmark, printed side by side in one run (params.yaml's vqgan sizes, digits at 32px).

(a) autoencoder stage images/s: a hand-written PyTorch loop (L1 + VQ loss only) as the baseline, then
    the shared loop's autoencoder stage before ``disc_start`` (L1 + VQ + dead-code bookkeeping) and after
    it (+ PatchGAN, adaptive weight: two extra gradient passes), and the same plain loop with the ViT-VQGAN
    tokenizer (``tokenizer: vit``, params.yaml's vit sizes: the same 8x8 code grid).
(b) prior training tokens/s: our GPT vs torch.nn.TransformerEncoder (pre-norm, causal mask) of the
    same width and depth as the baseline.
(c) sampling images/s with the KV cache vs without it (same model, same uniforms, same samples).
Each on the GPU as well when one is present.
Usage: python benchmarks/bench_vqgan.py [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rate(fn, n_items: int, steps: int, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_items * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()

    from ganforge.models.nn.gpt import sample
    from ganforge.models.families.vqgan import VQGAN
    from ganforge.tasks.loop import LocalSession, run_stage
    from ganforge.tasks.params import DataParams, load_params
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-vqgan-"))
    shard("digits", tmp / "shards", DataParams(resolution=32, workers=2), progress=False)
    base = load_params("params.yaml", {"train.family": "vqgan", "train.resolution": 32, "train.checkpoint_kimg": 1000,
                                       "train.log_every": 10})
    fam = VQGAN(base.train)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    batch = base.train.batch_size
    for dev in devices:
        print(f"== {dev.type} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else f"== {torch.cuda.get_device_name()}")
        # (a) autoencoder
        vq = fam.vq_model().to(dev)
        opt = torch.optim.Adam(vq.parameters(), lr=2e-4)
        x = torch.rand(batch, 3, 32, 32, device=dev) * 2 - 1

        def plain_step():
            rec, q, _ = vq(x)
            loss = (rec - x).abs().mean() + q
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        plain = _rate(plain_step, batch, a.steps, dev)
        vit_fam = VQGAN(base.train.model_copy(update={"vqgan": base.train.vqgan.model_copy(update={"tokenizer": "vit"})}))
        vit = vit_fam.vq_model().to(dev)
        vopt = torch.optim.Adam(vit.parameters(), lr=2e-4)

        def vit_step():
            rec, q, _ = vit(x)
            loss = (rec - x).pow(2).mean() + q
            vopt.zero_grad(set_to_none=True)
            loss.backward()
            vopt.step()

        vit_rate = _rate(vit_step, batch, a.steps, dev)
        rates = []
        for disc_start in (10_000, 0):
            p = base.train.model_copy(update={"vqgan": base.train.vqgan.model_copy(update={"disc_start": disc_start})})
            s = LocalSession(tmp / f"ae{disc_start}{dev.type}", device=dev.type)
            run_stage({"params": p.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"), "run_dir": None,
                       "max_steps": a.steps + 10}, s)
            rates.append(s.reports[-1]["images_per_s"])  # the last window: steady state
        print(f"(a) autoencoder stage, 32px, batch {batch}, images/s:")
        print(f"    plain PyTorch loop (L1 + VQ)          {plain:8.1f}   (baseline)")
        print(f"    ganforge stage, before disc_start     {rates[0]:8.1f}   ratio {rates[0] / plain:5.2f}")
        print(f"    ganforge stage, PatchGAN on           {rates[1]:8.1f}   ratio {rates[1] / plain:5.2f}")
        print(f"    plain loop, ViT-VQGAN tokenizer       {vit_rate:8.1f}   ratio {vit_rate / plain:5.2f}")

        # (b) prior training tokens/s
        pp = base.train.vqgan
        n = fam.n_tokens
        gpt = fam.gpt().to(dev)
        tokens = torch.randint(0, pp.n_embed, (batch, n), device=dev)
        cond = torch.zeros(batch, dtype=torch.long, device=dev)
        gopt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)

        def gpt_step():
            logits = gpt(tokens[:, :-1], cond)
            loss = F.cross_entropy(logits.reshape(-1, pp.n_embed), tokens.reshape(-1))
            gopt.zero_grad(set_to_none=True)
            loss.backward()
            gopt.step()

        layer = torch.nn.TransformerEncoderLayer(pp.n_embd, pp.n_head, 4 * pp.n_embd, 0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        ref = torch.nn.ModuleDict({"emb": torch.nn.Embedding(pp.n_embed, pp.n_embd),
                                   "enc": torch.nn.TransformerEncoder(layer, pp.n_layer, enable_nested_tensor=False),
                                   "head": torch.nn.Linear(pp.n_embd, pp.n_embed, bias=False)}).to(dev)
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=dev)

        def ref_step():
            h = ref["enc"](ref["emb"](tokens), mask=mask, is_causal=True)
            loss = F.cross_entropy(ref["head"](h).reshape(-1, pp.n_embed), tokens.reshape(-1))
            ropt.zero_grad(set_to_none=True)
            loss.backward()
            ropt.step()

        ours, theirs = _rate(gpt_step, batch * n, a.steps, dev), _rate(ref_step, batch * n, a.steps, dev)
        print(f"(b) prior training, {n} tokens/grid, {pp.n_layer} layers x {pp.n_embd}, batch {batch}, tokens/s:")
        print(f"    torch.nn.TransformerEncoder            {theirs:8.0f}   (baseline)")
        print(f"    ganforge GPT                           {ours:8.0f}   ratio {ours / theirs:5.2f}")

        # (c) sampling with vs without KV cache
        gpt.eval()
        nb = 16
        u = torch.rand(nb, n, generator=torch.Generator().manual_seed(0)).to(dev)
        c = torch.zeros(nb, dtype=torch.long, device=dev)
        out = {}
        for cache in (False, True):
            t = time.perf_counter()
            out[cache] = sample(gpt, c, (fam.grid_hw, fam.grid_hw), u, use_cache=cache)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out[f"t{cache}"] = time.perf_counter() - t
        same = torch.equal(out[False], out[True])
        print(f"(c) sampling {nb} grids of {fam.grid_hw}x{fam.grid_hw} tokens, grids/s (identical samples: {same}):")
        print(f"    without KV cache                       {nb / out['tFalse']:8.1f}   (baseline)")
        print(f"    with KV cache                          {nb / out['tTrue']:8.1f}   speed-up {out['tFalse'] / out['tTrue']:5.2f}x")


if __name__ == "__main__":
    main()
