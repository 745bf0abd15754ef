"""Metrics benchmark: ganforge's feature extractor vs a plain loop over the same TorchScript
model (batch 50, fp32, default threads) on the same images, in one run; plus the speed-up
from cached reference statistics. Usage: python benchmarks/bench_metrics.py [--n 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()

    from ganforge.tasks.data import iter_split
    from ganforge.tasks.images import extract_features, image_set, reference_features
    from ganforge.tasks.metrics import inception_weights_path, tf1_resize
    from ganforge.tasks.params import DataParams
    from ganforge.tasks.shard import shard

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-metrics-"))
    shard(f"synthetic:shapes:{a.n}", tmp / "s", DataParams(resolution=32, val_fraction=0.0, workers=2), progress=False)
    imgs = np.concatenate([b[0] for b in iter_split(tmp / "s", "train", 256)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(inception_weights_path())).eval()
    t = time.perf_counter()
    plain = []
    with torch.no_grad():
        for i in range(0, len(imgs), 50):
            x = tf1_resize(torch.from_numpy(imgs[i:i + 50]).permute(0, 3, 1, 2).float()) / 128 - 1
            plain.append(model(x).numpy())
    plain = np.concatenate(plain)
    r_plain = len(imgs) / (time.perf_counter() - t)

    s = image_set(str(tmp / "s"), "train")
    extract_features(s, workers=a.workers, batch_size=25, progress=False)  # warm Ray up (start-up is not per call)
    t = time.perf_counter()
    ours = extract_features(s, workers=a.workers, batch_size=25, progress=False)
    r_ours = len(imgs) / (time.perf_counter() - t)
    rel = np.max(np.abs(ours - plain)) / np.max(np.abs(plain))
    print(f"features/s on {len(imgs)} images (32px -> 299, TF Inception pool3, CPU):")
    print(f"    plain loop (batch 50, {torch.get_num_threads()} threads) {r_plain:7.2f}  (baseline)")
    print(f"    ganforge ({a.workers} Ray workers)          {r_ours:7.2f}  ratio {r_ours / r_plain:5.2f}x  "
          f"max relative feature difference {rel:.2e}")

    t = time.perf_counter()
    reference_features(tmp / "s", "train", "tf1", tmp / "cache", workers=a.workers, progress=False)
    miss = time.perf_counter() - t
    t = time.perf_counter()
    reference_features(tmp / "s", "train", "tf1", tmp / "cache", workers=a.workers, progress=False)
    hit = time.perf_counter() - t
    print(f"reference statistics: computed {miss:.2f}s, cached {hit:.3f}s -> {miss / hit:.0f}x faster")


if __name__ == "__main__":
    main()
