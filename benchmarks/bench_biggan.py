"""BigGAN training throughput, side by side in one run.

(a) CPU, 32px: images/s of the shared loop under Ray Train (1 and 2 workers) against a plain single-process loop
    (LocalSession) of the same networks, batch and total thread count: the ratio is what Ray costs or brings.
(b) CUDA, 128px (when a GPU is present; skipped otherwise): images/s with AMP off and on, and peak memory.
Usage: python benchmarks/bench_biggan.py [--kimg 0.64] [--ch 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kimg", type=float, default=0.64, help="images per measurement (thousands)")
    ap.add_argument("--ch", type=int, default=32)
    a = ap.parse_args()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ganforge.tasks.loop import LocalSession, ray_train_loop, run_stage
    from ganforge.tasks.params import DataParams, Params
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-biggan-"))
    shard("digits", tmp / "shards", DataParams(resolution=128 if torch.cuda.is_available() else 32, workers=2),
          progress=False)

    def params(res: int, **train) -> Params:
        return Params.model_validate({"train": dict(
            family="biggan", resolution=res, batch_size=32, checkpoint_kimg=1000, log_every=2, **train,
            biggan=dict(ch=a.ch, kimg=a.kimg, d_steps=2, attention=16))})

    def cfg(p: Params, threads: int) -> dict:
        return {"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"),
                "run_dir": None, "threads": threads}

    p = params(32)
    torch.set_num_threads(2)
    s = LocalSession(tmp / "local", device="cpu")
    run_stage(cfg(p, 2), s)
    plain = s.reports[-2]["images_per_s"]
    init_ray(p.runtime)
    rates = {}
    for n in (1, 2):
        res = TorchTrainer(ray_train_loop, train_loop_config=cfg(p, 2 // n),
                           scaling_config=ScalingConfig(num_workers=n),
                           run_config=RunConfig(storage_path=str(tmp / "ray"), name=f"bench-{n}w")).fit()
        rates[n] = res.metrics["images_per_s"]
    print(f"(a) BigGAN ch {a.ch} 32px, batch 32, 2 CPU threads in total, steady-state real images/s (D steps count):")
    print(f"    plain single-process loop   {plain:8.1f}   (baseline)")
    for n, r in rates.items():
        print(f"    Ray Train, {n} worker(s)      {r:8.1f}   ratio {r / plain:5.2f}x")

    if not torch.cuda.is_available():
        print("(b) skipped: no CUDA GPU on this machine")
        return
    for amp in (False, True):
        p = params(128, amp=amp, gpus_per_worker=1)
        torch.cuda.reset_peak_memory_stats()
        s = LocalSession(tmp / f"gpu-{amp}", device="cuda")
        run_stage(cfg(p, 4), s)
        print(f"(b) 128px CUDA AMP {'on ' if amp else 'off'}: {s.reports[-2]['images_per_s']:8.1f} img/s, peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
