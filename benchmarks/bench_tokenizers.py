"""VQ-GAN's two tokenizers side by side in one run: autoencoder training images/s of ``tokenizer: vit``
(ViT-VQGAN) against ``tokenizer: conv`` (the baseline), at the same code grid, in a plain PyTorch loop
(reconstruction + VQ loss, Adam), and the codebook usage each reaches on real digits in the same number of steps.

Sizes: params.yaml's vqgan section at 32px (8x8 codes for both); with ``--resolution 128``, conv ``ch_mult
[1, 1, 2, 2]`` and vit ``patch_size 8`` (16x16 codes for both). On a GPU each runs under bf16 autocast, and once
more through torch.compile.
Usage: python benchmarks/bench_tokenizers.py [--resolution 32] [--batch 32] [--steps 20] [--usage-steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _digits(resolution: int, n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 8 - 1
    return F.interpolate(x, size=resolution, mode="bilinear", antialias=True).clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--usage-steps", type=int, default=200, help="training steps on digits before counting codes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    from ganforge.models.families.vqgan import VQGAN, codebook_stats
    from ganforge.tasks.params import load_params

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:  # as the training loop
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = load_params("params.yaml", {"train.family": "vqgan", "train.resolution": a.resolution}).train
    sizes = {} if a.resolution == 32 else {"conv": {"ch_mult": [1, 1, 2, 2]}, "vit": {"patch_size": 8}}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    x = (torch.rand(a.batch, 3, a.resolution, a.resolution) * 2 - 1).to(dev)
    digits = _digits(a.resolution, 1024).to(dev)
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{where}; {a.resolution}px, batch {a.batch}{', bf16 autocast' if cuda else ''}")
    print(f"  {'tokenizer':34s} {'codes':>6s} {'params':>8s} {'img/s':>9s} {'ratio':>6s} {'usage':>6s} {'perplexity':>10s}")
    base_rate = None
    for kind in ("conv", "vit"):
        vq_section = base.vqgan.model_copy(update={"tokenizer": kind, **sizes.get(kind, {})})
        fam = VQGAN(base.model_copy(update={"vqgan": vq_section}))
        for compiled in ([False, True] if cuda else [False]):
            torch.manual_seed(0)
            vq = fam.vq_model().to(dev)
            model = torch.compile(vq) if compiled else vq
            opt = torch.optim.Adam(vq.parameters(), lr=vq_section.lr, betas=tuple(vq_section.betas))  # the stage's

            def step(batch: torch.Tensor):
                with autocast():
                    rec, q, info = model(batch)
                err = rec.float() - batch
                loss = (err.abs().mean() if fam.rec_loss == "l1" else err.pow(2).mean()) + q.float()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return info

            for _ in range(3):
                step(x)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(a.steps):
                step(x)
            _sync(dev)
            rate = a.batch * a.steps / (time.perf_counter() - t)
            base_rate = base_rate or rate
            usage = ""
            if not compiled:
                g = torch.Generator().manual_seed(0)
                for _ in range(a.usage_steps):
                    step(digits[torch.randint(0, len(digits), (a.batch,), generator=g).to(dev)])
                with torch.no_grad():
                    st = codebook_stats(vq.encode_codes(digits), vq.quantize.n_embed)
                usage = f"{st['codebook_usage']:6.2f} {st['perplexity']:10.1f}"
            n_params = sum(p.numel() for p in vq.parameters())
            label = f"{kind}{' (baseline)' if kind == 'conv' else ''}{', torch.compile' if compiled else ''}"
            print(f"  {label:34s} {fam.grid_hw:>3d}^2 {n_params / 1e6:7.2f}M {rate:9.1f} {rate / base_rate:6.2f} {usage}")


if __name__ == "__main__":
    main()
