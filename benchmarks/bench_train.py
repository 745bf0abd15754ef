"""Training benchmark, printed side by side in one run.

(a) Ray Train step throughput vs a plain single-process loop (the same shared loop
    under LocalSession), same model, batch and thread count: the overhead ratio.
(w) two workers against one, at 8, 16 and 32px (one core and one thread per worker, global batch 32,
    log_every 10): with every row sent as its own Ray Train report (train.report_interval_s 0, how
    ganforge reported before) and with rows batched into a report every 5 s (the default).
(b) images/s per resolution on this machine (plain loop, CPU).
(c) GPU AMP on/off at 32/64/128 when a GPU is present (skipped otherwise).
Usage: python benchmarks/bench_train.py [--kimg 3.2] [--only a,w,b,c]
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
    ap.add_argument("--only", default="a,w,b,c", help="which parts to run")
    a = ap.parse_args()
    parts = set(a.only.split(","))

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ganforge.tasks.loop import LocalSession, ray_train_loop, run_stage
    from ganforge.tasks.params import DataParams, Params, RuntimeParams
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-train-"))
    shard("digits", tmp / "shards", DataParams(resolution=128, workers=2), progress=False)

    def params(res, batch=32, kimg=None, **kw):
        return Params.model_validate({"train": dict(
            resolution=res, batch_size=batch, checkpoint_kimg=1000, **{"log_every": 20, **kw},
            progan=dict(start_resolution=res, transition_kimg=0, stabilize_kimg=kimg or a.kimg, fmap_max=64))})

    def cfg(p):
        return {"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"), "run_dir": None,
                "threads": 1, "report_interval_s": p.train.report_interval_s}

    def ray_rate(p, workers: int, name: str) -> float:
        """Steady-state images/s of a Ray Train run: the mean over its metric rows after the first two (every row
        of every report, collected on the driver as `ganforge train` does)."""
        from ray.util.queue import Queue

        from ganforge.tasks.loop import ROWS
        from ganforge.tasks.train import ReportForwarder

        q = Queue(actor_options={"num_cpus": 0})
        TorchTrainer(ray_train_loop, train_loop_config=cfg(p), scaling_config=ScalingConfig(num_workers=workers),
                     run_config=RunConfig(storage_path=str(tmp / "ray"), name=name,
                                          callbacks=[ReportForwarder(q)])).fit()
        rows = []
        while not q.empty():
            metrics, _ = q.get()
            rows += metrics.get(ROWS) or [metrics]
        q.shutdown()
        rates = [r["images_per_s"] for r in rows[2:]] or [rows[-1]["images_per_s"]]
        return sum(rates) / len(rates)

    init_ray(RuntimeParams())
    if "w" in parts:
        print("(w) 2 workers / 1 worker, images/s (ProGAN fmap_max 64, global batch 32, log_every 10, 1 core each):")
        for r, kimg in ((8, 3.2), (16, 3.2), (32, 1.6)):
            out = {}
            for interval in (0.0, 5.0):
                for w in (1, 2):
                    p = params(r, kimg=kimg, log_every=10, report_interval_s=interval)
                    out[interval, w] = ray_rate(p, w, f"w{r}-{w}-{interval}")
            before, after = out[0.0, 2] / out[0.0, 1], out[5.0, 2] / out[5.0, 1]
            print(f"    {r:3d}px  every row reported: 1w {out[0.0, 1]:6.1f}  2w {out[0.0, 2]:6.1f}  ratio {before:4.2f}x"
                  f"   |  batched (5 s): 1w {out[5.0, 1]:6.1f}  2w {out[5.0, 2]:6.1f}  ratio {after:4.2f}x", flush=True)
    if "a" not in parts:
        return

    # (a) overhead: 1 Ray worker vs the plain loop, 1 thread each; steady state = last report window
    p = params(a.resolution)
    torch.set_num_threads(1)
    s = LocalSession(tmp / "local")
    run_stage(cfg(p), s)
    plain = s.reports[-2]["images_per_s"]
    ray1 = ray_rate(p, 1, "bench-1w")
    ray2 = ray_rate(p, 2, "bench-2w")
    print(f"(a) {a.resolution}px batch 32, steady-state images/s (1 thread per process):")
    print(f"    plain loop           {plain:8.1f}   (baseline)")
    print(f"    Ray Train, 1 worker  {ray1:8.1f}   step-time overhead ratio {plain / ray1:5.3f} (target <= 1.10)")
    print(f"    Ray Train, 2 workers {ray2:8.1f}   speed-up {ray2 / plain:5.2f}x over the plain loop")

    # (b) images/s per resolution (plain loop, default threads)
    if "b" not in parts:
        return
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
