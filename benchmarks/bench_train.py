"""Training benchmark, printed side by side in one run.

(a) Ray Train step throughput vs a plain single-process loop (the same shared loop
    under LocalSession), same model, batch and thread count: the overhead ratio.
(b) images/s per resolution on this machine (plain loop, CPU).
(c) GPU AMP on/off at 32/64/128 when a GPU is present (skipped otherwise).
Usage: python benchmarks/bench_train.py [--kimg 3.2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kimg", type=float, default=3.2, help="images per measurement (thousands)")
    ap.add_argument("--resolution", type=int, default=16)
    a = ap.parse_args()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ganforge.tasks.loop import LocalSession, ray_train_loop, run_stage
    from ganforge.tasks.params import DataParams, Params
    from ganforge.tasks.shard import shard
    from ganforge.tasks.train import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-train-"))
    shard("digits", tmp / "shards", DataParams(resolution=128, workers=2), progress=False)

    def params(res, batch=32, **kw):
        return Params.model_validate({"train": dict(
            resolution=res, batch_size=batch, checkpoint_kimg=1000, log_every=20, **kw,
            progan=dict(start_resolution=res, transition_kimg=0, stabilize_kimg=a.kimg, fmap_max=64))})

    def cfg(p):
        return {"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"), "run_dir": None, "threads": 1}

    # (a) overhead: 1 Ray worker vs the plain loop, 1 thread each; steady state = last report window
    p = params(a.resolution)
    torch.set_num_threads(1)
    s = LocalSession(tmp / "local")
    run_stage(cfg(p), s)
    plain = s.reports[-2]["images_per_s"]
    init_ray(p)
    res = TorchTrainer(ray_train_loop, train_loop_config=cfg(p), scaling_config=ScalingConfig(num_workers=1),
                       run_config=RunConfig(storage_path=str(tmp / "ray"), name="bench-1w")).fit()
    ray1 = res.metrics["images_per_s"]
    res2 = TorchTrainer(ray_train_loop, train_loop_config=cfg(p), scaling_config=ScalingConfig(num_workers=2),
                        run_config=RunConfig(storage_path=str(tmp / "ray"), name="bench-2w")).fit()
    ray2 = res2.metrics["images_per_s"]
    print(f"(a) {a.resolution}px batch 32, steady-state images/s (1 thread per process):")
    print(f"    plain loop           {plain:8.1f}   (baseline)")
    print(f"    Ray Train, 1 worker  {ray1:8.1f}   step-time overhead ratio {plain / ray1:5.3f} (target <= 1.10)")
    print(f"    Ray Train, 2 workers {ray2:8.1f}   speed-up {ray2 / plain:5.2f}x over the plain loop")

    # (b) images/s per resolution (plain loop, default threads)
    torch.set_num_threads(2)
    print("(b) plain loop images/s per resolution (CPU, 2 threads, fmap_max 64, batch 32):")
    for r in (4, 8, 16, 32, 64):
        s = LocalSession(tmp / f"res{r}")
        run_stage({**cfg(params(r)), "max_steps": 40}, s)
        print(f"    {r:4d}px  {s.reports[-1]['images_per_s']:8.1f} img/s")

    # (c) GPU
    if not torch.cuda.is_available():
        print("(c) no GPU on this machine: AMP / channels_last numbers need the lent GPU machine")
        return
    print("(c) GPU images/s, AMP off vs on:")
    for r in (32, 64, 128):
        out = []
        for amp in (False, True):
            s = LocalSession(tmp / f"gpu{r}{amp}", device="cuda")
            run_stage({**cfg(params(r, batch=64, amp=amp)), "max_steps": 60}, s)
            out.append(s.reports[-1]["images_per_s"])
        print(f"    {r:4d}px  fp32 {out[0]:8.1f}  amp {out[1]:8.1f}  ratio {out[1] / out[0]:5.2f}x")


if __name__ == "__main__":
    main()
