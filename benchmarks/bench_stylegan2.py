"""StyleGAN2 training throughput, side by side in one run.

(a) CPU, 32px, batch 32, 2 threads in total: images/s of
    - a plain single-process PyTorch loop: the same networks and the family's step (lazy R1 / path length / style
      mixing included) on batches already in memory, no EMA, no checkpoints, no data pipeline (the baseline);
    - the shared loop in one process (LocalSession: data stream, EMA, reports);
    - the shared loop under Ray Train with 1 and 2 workers (gloo DDP).
(b) CUDA (when a GPU is present; skipped otherwise): 64px and 256px at the paper's width per resolution, batch 32,
    images/s of the family's step with AMP (bf16) + channels_last against fp32, with and without torch.compile of
    G and D, and peak memory.
Every rate is over steps 16-31 of a stage (after 16 warm-up steps), so each includes the same lazy R1 and
path-length steps.
Usage: python benchmarks/bench_stylegan2.py
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch


WINDOW = 16  # steps per measurement: one R1 step (every 16) and four path-length steps (every 4) in each


def plain_loop(p, images: torch.Tensor, device: str = "cpu", amp: bool = False, channels_last: bool = False,
               compile_: bool = False) -> float:
    """Images/s of the family's step in a bare loop: steps 16-31, after 16 warm-up steps (the same steps, and so
    the same lazy-regularizer mix, as the shared loop's second report window)."""
    from ganforge.models.families import get_family
    from ganforge.models.family import StepContext

    fam = get_family(p.train)
    stage = fam.stages()[0]
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mods = {k: m.to(dev, memory_format=fmt) for k, m in fam.build(stage).items()}
    opts = fam.optimizers(mods)
    if compile_:
        mods = {k: torch.compile(m) for k, m in mods.items()}
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    bs = p.train.batch_size
    batch = {"image": images[:bs].to(dev, memory_format=fmt), "label": torch.full((bs,), -1, device=dev)}
    t0 = None
    for step in range(2 * WINDOW):
        if step == WINDOW:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ctx = StepContext(step, step * bs, torch.Generator().manual_seed(step), dev, ac,
                          lambda m: contextlib.nullcontext())
        fam.train_step(mods, opts, batch, stage, ctx)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return WINDOW * bs / (time.perf_counter() - t0)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ganforge.tasks.data import iter_split, to_model_input
    from ganforge.tasks.loop import LocalSession, ray_train_loop, run_stage
    from ganforge.tasks.params import DataParams, Params
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-stylegan2-"))
    shard("digits", tmp / "shards", DataParams(resolution=32, workers=2), progress=False)

    def params(res: int, **section) -> Params:
        return Params.model_validate({"train": dict(
            family="stylegan2", resolution=res, batch_size=32, checkpoint_kimg=1000, log_every=WINDOW,
            stylegan2=dict(kimg=2 * WINDOW * 32 / 1000, **section))})

    def cfg(p: Params, threads: int) -> dict:
        return {"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"),
                "run_dir": None, "threads": threads}

    p = params(32)
    imgs, _ = next(iter_split(tmp / "shards", "train", 32))
    real = to_model_input(imgs, 32)
    torch.set_num_threads(2)
    bare = plain_loop(p, real)
    s = LocalSession(tmp / "local", device="cpu")
    run_stage(cfg(p, 2), s)
    shared = s.reports[-1]["images_per_s"]  # steps 16-31
    init_ray(p.runtime)
    rates = {}
    for n in (1, 2):
        res = TorchTrainer(ray_train_loop, train_loop_config=cfg(p, 2 // n),
                           scaling_config=ScalingConfig(num_workers=n),
                           run_config=RunConfig(storage_path=str(tmp / "ray"), name=f"bench-{n}w")).fit()
        rates[n] = res.metrics["images_per_s"]
    c = p.train.stylegan2
    print(f"(a) StyleGAN2 32px (channel_base {c.channel_base}, channel_max {c.channel_max}, mapping "
          f"{c.mapping_layers}), batch 32, 2 CPU threads in total, steady-state real images/s:")
    print(f"    plain single-process PyTorch loop  {bare:8.1f}   (baseline)")
    print(f"    shared loop, one process           {shared:8.1f}   ratio {shared / bare:5.2f}x")
    for n, r in rates.items():
        print(f"    Ray Train, {n} worker(s)             {r:8.1f}   ratio {r / bare:5.2f}x")

    if not torch.cuda.is_available():
        print("(b) skipped: no CUDA GPU on this machine")
        return
    for res in (64, 256):
        pg = params(res, channel_base=32768, channel_max=512)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(32, 3, res, res, generator=g) * 2 - 1
        rows = []
        for amp, cl, comp in ((False, False, False), (True, True, False), (True, True, True)):
            torch.cuda.reset_peak_memory_stats()
            try:
                r = plain_loop(pg, x, "cuda", amp=amp, channels_last=cl, compile_=comp)
            except Exception as e:  # noqa: BLE001 - torch.compile can fail on a platform: say so, keep measuring
                print(f"(b) {res}px amp={amp} compile={comp}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append((amp, cl, comp, r, torch.cuda.max_memory_allocated() / 2**20))
        base = rows[0][3] if rows else 1.0
        for amp, cl, comp, r, mem in rows:
            print(f"(b) {res}px CUDA {'bf16 AMP + channels_last' if amp else 'fp32':25} compile {'on ' if comp else 'off'}"
                  f" {r:8.1f} img/s  ratio {r / base:5.2f}x  peak {mem:.0f} MiB")


if __name__ == "__main__":
    main()
