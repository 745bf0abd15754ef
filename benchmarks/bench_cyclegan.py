"""CycleGAN training throughput, side by side in one run.

(a) CPU, 64px, params.yaml's widths (ngf 16, ndf 16, 6 residual blocks), batch 4, 2 threads in total: (A, B)
    pairs per second of
    - a plain single-process PyTorch loop: the same four networks updated as pytorch-CycleGAN-and-pix2pix's
      ``optimize_parameters`` does (G step with the identity and cycle losses, then both D's on pool fakes),
      written out here without ganforge, on batches already in memory (the baseline);
    - ganforge's family step (``CycleGAN.train_step``: lr schedule, history pools) in the same bare loop;
    - the shared loop in one process (LocalSession: the two-domain stream with resize-then-crop, reports);
    - the shared loop under Ray Train with 1 and 2 workers (gloo DDP).
(b) CUDA (when a GPU is present; skipped otherwise): 256px at the paper's widths (ngf 64, ndf 64, 9 blocks),
    batch 1 and 4, pairs/s of the family step in fp32 and with bf16 AMP + channels_last, and peak memory.
Every rate is over steps 8-15 of a stage, after 8 warm-up steps.
Usage: python benchmarks/bench_cyclegan.py
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WINDOW = 8


def _setup(p, device: str, channels_last: bool = False):
    from ganforge.models.families import get_family

    fam = get_family(p.train)
    stage = fam.stages()[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mods = {k: m.to(device, memory_format=fmt) for k, m in fam.build(stage).items()}
    return fam, stage, mods, fam.optimizers(mods), fmt


def _timed(step_fn, device: str) -> float:
    t0 = None
    for step in range(2 * WINDOW):
        if step == WINDOW:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step_fn(step)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def reference_loop(p, a: torch.Tensor, b: torch.Tensor) -> float:
    """Pairs/s of the reference's update, written out without ganforge's step (pool: its query rule)."""
    import random

    _, _, m, opts, _ = _setup(p, "cpu")
    G, Fn, DA, DB = m["G_AB"], m["G_BA"], m["D_A"], m["D_B"]
    c = p.train.cyclegan
    lam, idt = c.lambda_cycle, c.lambda_identity
    pools: dict[str, list] = {"A": [], "B": []}

    def query(name: str, imgs: torch.Tensor) -> torch.Tensor:
        out = []
        for img in imgs.detach():
            pool = pools[name]
            if len(pool) < c.pool_size:
                pool.append(img)
                out.append(img)
            elif random.uniform(0, 1) > 0.5:
                k = random.randint(0, c.pool_size - 1)
                out.append(pool[k].clone())
                pool[k] = img
            else:
                out.append(img)
        return torch.stack(out)

    def step(_: int) -> None:
        fake_b, fake_a = G(a), Fn(b)
        rec_a, rec_b = Fn(fake_b), G(fake_a)
        for d in (DA, DB):
            d.requires_grad_(False)
        loss_g = ((DB(fake_b) - 1) ** 2).mean() + ((DA(fake_a) - 1) ** 2).mean() \
            + lam * (F.l1_loss(rec_a, a) + F.l1_loss(rec_b, b)) \
            + lam * idt * (F.l1_loss(G(b), b) + F.l1_loss(Fn(a), a))
        opts["G"].zero_grad()
        loss_g.backward()
        opts["G"].step()
        for d in (DA, DB):
            d.requires_grad_(True)
        opts["D"].zero_grad()
        for d, real, fake in ((DB, b, query("B", fake_b)), (DA, a, query("A", fake_a))):
            (0.5 * (((d(real) - 1) ** 2).mean() + (d(fake.detach()) ** 2).mean())).backward()
        opts["D"].step()

    return WINDOW * len(a) / _timed(step, "cpu")


def family_loop(p, a: torch.Tensor, b: torch.Tensor, device: str = "cpu", amp: bool = False,
                channels_last: bool = False) -> float:
    """Pairs/s of ``CycleGAN.train_step`` on batches in memory."""
    from ganforge.models.family import StepContext

    fam, stage, mods, opts, fmt = _setup(p, device, channels_last)
    batch = {"image_a": a.to(device, memory_format=fmt), "image_b": b.to(device, memory_format=fmt)}
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    dev = torch.device(device)

    def step(i: int) -> None:
        ctx = StepContext(i, i * len(a), torch.Generator().manual_seed(i), dev, ac, lambda m: contextlib.nullcontext())
        fam.train_step(mods, opts, batch, stage, ctx)

    return WINDOW * len(a) / _timed(step, device)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ganforge.tasks.data import DomainPairStream
    from ganforge.tasks.loop import LocalSession, ray_train_loop, run_stage
    from ganforge.tasks.params import DataParams, Params, load_params
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-cyclegan-"))
    shard("photo:china:200", tmp / "shards", DataParams(source_b="photo:flower:200", resolution=64, workers=2),
          progress=False)
    section = load_params().train.cyclegan.model_dump()  # params.yaml's CPU widths

    def params(res: int, batch: int, **over) -> Params:
        return Params.model_validate({"train": dict(
            family="cyclegan", resolution=res, batch_size=batch, checkpoint_kimg=1000, log_every=WINDOW,
            cyclegan={**section, "kimg": 2 * WINDOW * batch / 1000, **over})})

    def cfg(p: Params, threads: int) -> dict:
        return {"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(tmp / "shards"),
                "run_dir": None, "threads": threads}

    p = params(64, 4)
    a, b = next(iter(DomainPairStream(tmp / "shards", 64, 4, load_size=72)))
    torch.set_num_threads(2)
    ref = reference_loop(p, a, b)
    fam = family_loop(p, a, b)
    s = LocalSession(tmp / "local", device="cpu")
    run_stage(cfg(p, 2), s)
    shared = s.reports[-1]["images_per_s"]  # steps 8-15
    init_ray(p.runtime)
    rates = {}
    for n in (1, 2):
        res = TorchTrainer(ray_train_loop, train_loop_config=cfg(p, 2 // n),
                           scaling_config=ScalingConfig(num_workers=n),
                           run_config=RunConfig(storage_path=str(tmp / "ray"), name=f"bench-{n}w")).fit()
        rates[n] = res.metrics["images_per_s"]
    c = p.train.cyclegan
    print(f"(a) CycleGAN 64px (ngf {c.ngf}, ndf {c.ndf}, {c.n_blocks} blocks), batch 4, 2 CPU threads in total, "
          f"steady-state (A, B) pairs/s:")
    print(f"    plain single-process loop (the reference's update)  {ref:7.1f}   (baseline)")
    print(f"    ganforge's family step, same bare loop              {fam:7.1f}   ratio {fam / ref:5.2f}x")
    print(f"    shared loop, one process                            {shared:7.1f}   ratio {shared / ref:5.2f}x")
    for n, r in rates.items():
        print(f"    Ray Train, {n} worker(s)                              {r:7.1f}   ratio {r / ref:5.2f}x")

    if not torch.cuda.is_available():
        print("(b) skipped: no CUDA GPU on this machine")
        return
    for batch in (1, 4):
        pg = params(256, batch, ngf=64, ndf=64, n_blocks=9, d_layers=3)
        g = torch.Generator().manual_seed(0)
        xa, xb = (torch.rand(batch, 3, 256, 256, generator=g) * 2 - 1 for _ in range(2))
        rows = []
        for amp in (False, True):
            torch.cuda.reset_peak_memory_stats()
            r = family_loop(pg, xa, xb, "cuda", amp=amp, channels_last=amp)
            rows.append((amp, r, torch.cuda.max_memory_allocated() / 2**20))
        for amp, r, mem in rows:
            print(f"(b) 256px batch {batch} CUDA {'bf16 AMP + channels_last' if amp else 'fp32':25} {r:8.1f} pairs/s  "
                  f"ratio {r / rows[0][1]:5.2f}x  peak {mem:.0f} MiB")


if __name__ == "__main__":
    main()
