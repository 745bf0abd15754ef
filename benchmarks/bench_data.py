"""Data benchmark: sharding throughput, and the training stream vs torchvision ImageFolder.

Prints side-by-side numbers measured in the same run (machines here are noisy):
(a) sharding images/s (npy vs png encodings), (b) training-stream images/s at
32x32 vs ``ImageFolder`` + ``DataLoader`` over the same images, same worker count
and batch size, as a ratio, (c) our memory-mapped tar reader vs webdataset's own
tar iterator on the same shards (the hand-written reader stays only while this
ratio says it pays).  Usage: python benchmarks/bench_data.py [--n 6000] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from PIL import Image


def _rate(n_images: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6000, help="synthetic images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from ganforge.tasks.data import TrainStream, iter_split, train_loader
    from ganforge.tasks.params import DataParams
    from ganforge.tasks.shard import shard

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-"))
    src = f"synthetic:shapes:{a.n}"
    rates = {}
    for fmt in ("npy", "png"):
        p = DataParams(resolution=a.resolution, shard_size=1000, val_fraction=0.0, workers=a.workers, image_format=fmt)
        rates[fmt] = _rate(a.n, lambda: shard(src, tmp / fmt, p, progress=False))
    print(f"(a) sharding {a.n} images at {a.resolution}px, {a.workers} workers: "
          f"npy {rates['npy']:.0f} img/s | png {rates['png']:.0f} img/s")

    # The same images as a class-per-folder PNG tree for ImageFolder.
    folder = tmp / "folder"
    i = 0
    for imgs, labels in iter_split(tmp / "npy", "train", 256):
        for img, lab in zip(imgs, labels):
            d = folder / f"c{lab}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:06d}.png")
            i += 1
    n_epoch = i
    total = n_epoch * a.epochs
    n_batches = total // a.batch

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = datasets.ImageFolder(str(folder), transform=tf)

    def run_imagefolder():
        seen = 0
        dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True, persistent_workers=True)
        while seen < n_batches:
            for _ in dl:
                seen += 1
                if seen == n_batches:
                    break

    def run_stream(fmt):
        def go():
            it = train_loader(TrainStream(tmp / fmt, a.resolution, a.batch, seed=0), num_workers=a.workers)
            for _ in itertools.islice(it, n_batches):
                pass
        return go

    r_if = _rate(n_batches * a.batch, run_imagefolder)
    r_npy = _rate(n_batches * a.batch, run_stream("npy"))
    r_png = _rate(n_batches * a.batch, run_stream("png"))
    print(f"(b) training stream, {a.resolution}px, batch {a.batch}, {a.workers} loader workers, {n_batches} batches:")
    print(f"    ImageFolder+DataLoader {r_if:8.0f} img/s   (baseline)")
    print(f"    ganforge stream (npy)  {r_npy:8.0f} img/s   ratio {r_npy / r_if:5.2f}x")
    print(f"    ganforge stream (png)  {r_png:8.0f} img/s   ratio {r_png / r_if:5.2f}x")

    import webdataset as wds

    from ganforge.tasks.data import _iter_tar

    tars = sorted(str(t) for t in (tmp / "npy").glob("train-*.tar"))

    def read_ours():
        for t in tars:
            for _ in _iter_tar(t):
                pass

    def read_wds():
        for t in tars:
            for _ in wds.tariterators.tarfile_samples([{"url": t}]):
                pass

    reps = 3
    r_wds = _rate(n_epoch * reps, lambda: [read_wds() for _ in range(reps)])
    r_ours = _rate(n_epoch * reps, lambda: [read_ours() for _ in range(reps)])
    print(f"(c) tar reading (raw samples, no decode), {len(tars)} shards x {reps}:")
    print(f"    webdataset tarfile_samples {r_wds:8.0f} samples/s   (baseline)")
    print(f"    ganforge mmap reader       {r_ours:8.0f} samples/s   ratio {r_ours / r_wds:5.2f}x")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
