"""The textbook GANs' training cost, side by side in one run: every loss and trick of the dcgan family, the
semi-supervised GAN and every train.augment policy (DiffAugment, ADA at p = 0.5, Diffusion-GAN at T = 250),
against DCGAN with the non-saturating loss measured in the same run (the baseline).

Columns: real images/s (what kimg counts: every critic batch), G updates/s (what n_critic slows down), and the
ratio of each to the baseline's. The shared loop runs in-process (LocalSession), one configuration after the
other, on the same shards, batch and thread count; each is measured over its steady state (after warm-up).
Usage: python benchmarks/bench_textbook.py [--resolution 32] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = [
    ("dcgan non-saturating (baseline)", "dcgan", {}),
    ("dcgan minimax", "dcgan", {"loss": "minimax"}),
    ("dcgan least-squares (LSGAN)", "dcgan", {"loss": "least-squares"}),
    ("dcgan hinge", "dcgan", {"loss": "hinge"}),
    ("dcgan wasserstein (WGAN, n_critic 5)", "dcgan", {"loss": "wasserstein"}),
    ("dcgan wasserstein-gp (WGAN-GP, n_critic 5)", "dcgan", {"loss": "wasserstein-gp"}),
    ("dcgan conditional (CGAN)", "dcgan", {"conditional": True}),
    ("dcgan + feature matching", "dcgan", {"feature_matching": True}),
    ("dcgan + minibatch std", "dcgan", {"minibatch_std": True}),
    ("dcgan + instance noise + smoothing", "dcgan", {"instance_noise": 0.1, "label_smoothing": 0.1}),
    ("sgan (D + baseline classifier)", "sgan", {"width": 64}),
    ("sgan without the baseline", "sgan", {"width": 64, "baseline": False}),
    ("dcgan + augment diffaugment", "dcgan", {}, {"augment": "diffaugment"}),
    ("dcgan + augment ada (p 0.5, held)", "dcgan", {}, {"augment": "ada", "ada": {"p_init": 0.5, "kimg": 1e9}}),
    ("dcgan + augment diffusion (T 250, held)", "dcgan", {},
     {"augment": "diffusion", "diffusion": {"t_init": 250, "kimg": 1e9}}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="measured G updates per configuration")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from ganforge.tasks.loop import LocalSession, run_stage
    from ganforge.tasks.params import DataParams, TrainParams
    from ganforge.tasks.shard import shard

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-textbook-"))
    shard("digits", tmp / "shards", DataParams(resolution=a.resolution, workers=2, labelled_per_class=10),
          progress=False)

    rows = []
    for label, family, section, *train in CONFIGS:
        p = TrainParams.model_validate(dict(family=family, resolution=a.resolution, batch_size=32, checkpoint_kimg=1e6,
                                            log_every=10_000, **{family: section}, **(train[0] if train else {})))
        cfg = {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"), "run_dir": None}
        warm = LocalSession(tmp / "ckpt")
        run_stage({**cfg, "max_steps": a.warmup}, warm)
        resume = warm.checkpoints[-1]
        t0 = time.perf_counter()
        r = run_stage({**cfg, "max_steps": a.warmup + a.steps}, LocalSession(tmp / "ckpt2", resume_from=resume))
        dt = time.perf_counter() - t0
        from ganforge.tasks.checkpoint import load_state

        images = r["images_in_stage"] - load_state(resume)["images_in_stage"]
        rows.append((label, images / dt, a.steps / dt))
        print(f"  measured {label}", flush=True)

    base_img, base_g = rows[0][1], rows[0][2]
    print(f"\n{a.resolution}px, batch 32, {a.threads} threads, {a.steps} G updates each (in-process shared loop):")
    print(f"  {'configuration':44s} {'real img/s':>10s} {'ratio':>6s} {'G upd/s':>8s} {'ratio':>6s}")
    for label, img, g in rows:
        print(f"  {label:44s} {img:10.1f} {img / base_img:6.2f} {g:8.2f} {g / base_g:6.2f}")


if __name__ == "__main__":
    main()
