"""What train.augment costs, side by side in one run: a family's whole training step (DCGAN, StyleGAN2, BigGAN)
with each policy, against the same step with ``none`` measured in the same run (the baseline), and the policy
alone (what ``d_input`` adds on one batch).

ADA runs at p = 0.5 and Diffusion-GAN at T = 250, both held there (adjustment speed 1e9 kimg), so every step does
the same work. On a GPU the step runs under bf16 autocast with channels_last modules, as the training loop does;
with ``--compile`` the discriminator is also run through torch.compile. The step is the family's own
``train_step`` on random images (no data loading), so only the model and the augmentation are timed.
Usage: python benchmarks/bench_augment.py [--resolution 32] [--batch 32] [--steps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

POLICIES = [
    ("none (baseline)", {"augment": "none"}),
    ("diffaugment", {"augment": "diffaugment"}),
    ("ada, p 0.5", {"augment": "ada", "ada": {"p_init": 0.5, "kimg": 1e9}}),
    ("diffusion, T 250", {"augment": "diffusion", "diffusion": {"t_init": 250, "kimg": 1e9}}),
]
FAMILIES = {
    "dcgan": {"width": 32, "latent_dim": 64},
    "stylegan2": {"channel_base": 4096, "channel_max": 128, "latent_dim": 128, "w_dim": 128, "mapping_layers": 2},
    "biggan": {"ch": 32, "latent_dim": 64, "attention": 0},
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--compile", action="store_true", help="also time D through torch.compile (GPU)")
    a = ap.parse_args()

    from ganforge.models.families import get_family
    from ganforge.models.family import StepContext
    from ganforge.tasks.params import TrainParams

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:  # as the training loop
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fmt = torch.channels_last if cuda else torch.contiguous_format
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    modes = [False, True] if (a.compile and cuda) else [False]
    print(f"{where}; {a.resolution}px, batch {a.batch}, {a.steps} steps after {a.warmup} warm-up"
          f"{', bf16 autocast, channels_last' if cuda else ''}")
    for family in a.families.split(","):
        for compiled in modes:
            rows = []
            for label, train in POLICIES:
                tp = TrainParams.model_validate(dict(family=family, resolution=a.resolution, batch_size=a.batch,
                                                     **{family: FAMILIES[family]}, **train))
                fam = get_family(tp)
                mods = {k: m.to(dev, memory_format=fmt) for k, m in fam.build(fam.stages()[0]).items()}
                if compiled:  # R1 / gradient penalties differentiate D's compiled backward again
                    torch._functorch.config.donated_buffer = False
                    mods["D"] = torch.compile(mods["D"])
                opts = fam.optimizers(mods)
                real = (torch.rand(a.batch, 3, a.resolution, a.resolution, device=dev) * 2 - 1).to(memory_format=fmt)
                labels = torch.arange(a.batch, device=dev) % max(1, fam.num_classes)
                batch = {"image": real, "label": labels}

                def step(i: int) -> None:
                    ctx = StepContext(i, i * a.batch, torch.Generator().manual_seed(i), dev, autocast,
                                      lambda m: contextlib.nullcontext(), lambda: batch)
                    fam.train_step(mods, opts, batch, fam.stages()[0], ctx)

                for i in range(a.warmup):
                    step(i)
                _sync(dev)
                t = time.perf_counter()
                for i in range(a.steps):
                    step(a.warmup + i)
                _sync(dev)
                step_s = (time.perf_counter() - t) / a.steps
                gen = torch.Generator().manual_seed(0)
                ctx = StepContext(0, 0, gen, dev, autocast, lambda m: contextlib.nullcontext(), lambda: batch)
                fam.d_input(real, ctx)
                _sync(dev)
                t = time.perf_counter()
                for _ in range(a.steps):
                    fam.d_input(real, ctx)
                _sync(dev)
                rows.append((label, step_s, (time.perf_counter() - t) / a.steps))
            base = rows[0][1]
            print(f"\n{family}{' (D compiled)' if compiled else ''}: {'policy':22s} {'img/s':>9s} {'ratio':>6s} "
                  f"{'d_input ms/batch':>17s}")
            for label, s, aug in rows:
                print(f"  {'':{len(family) + (13 if compiled else 0)}s}{label:22s} {a.batch / s:9.1f} {base / s:6.2f} "
                      f"{aug * 1000:17.2f}")


if __name__ == "__main__":
    main()
