"""The FID curve's cost to training, measured side by side in one run.

The same ProGAN stage (digits, 2 Ray Train workers) trains twice: with eval.every_kimg off, then on (a
checkpoint scored every --every kimg by its own Ray task). Reported: steady-state training images/s (the
median of the loop's report windows) and the stage's wall time, and their ratios. On a machine whose cores
the two workers already use, the scoring task shares them (and says so); on a cluster it takes other nodes.
Usage: python benchmarks/bench_curve.py [--kimg 3.2 --every 0.8 --samples 500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kimg", type=float, default=3.2, help="images of the stage (thousands)")
    ap.add_argument("--every", type=float, default=0.8, help="eval.every_kimg")
    ap.add_argument("--samples", type=int, default=500, help="eval.every_num_samples")
    ap.add_argument("--resolution", type=int, default=16)
    a = ap.parse_args()

    from ganforge.tasks.console import configure
    from ganforge.tasks.curve import Curve, read_curve
    from ganforge.tasks.history import read_history
    from ganforge.tasks.params import DataParams, Params
    from ganforge.tasks.shard import shard
    from ganforge.tasks.train import train

    configure(progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-curve-"))
    shards = tmp / "shards"
    shard("digits", shards, DataParams(resolution=a.resolution, workers=2), progress=False)

    def run(name: str, every: float | None) -> tuple[float, float, int]:
        p = Params.model_validate({
            "data": {"shards": str(shards)},
            "train": dict(out=str(tmp / name), resolution=a.resolution, workers=2, batch_size=32, log_every=10,
                          checkpoint_kimg=a.every, progan=dict(start_resolution=a.resolution, transition_kimg=0,
                                                               stabilize_kimg=a.kimg, fmap_max=64)),
            "eval": dict(every_kimg=every, every_num_samples=a.samples, cache_dir=str(tmp / "cache")),
        })
        s = train(shards, p.train.out, p, curve=Curve(p, p.train.out, shards) if every else None)
        (stage, rec), = s["stages"].items()
        rates = [r["images_per_s"] for r in read_history(p.train.out, stage)[1:]]
        return statistics.median(rates), rec["wall_time_s"], len(read_curve(p.train.out))

    off = run("off", None)
    on = run("on", a.every)
    print(f"ProGAN {a.resolution}px, {a.kimg} kimg on 2 Ray workers; curve: every {a.every} kimg, "
          f"{a.samples} samples, FID (tf1)")
    print(f"    curve off  {off[0]:8.1f} img/s  wall {off[1]:7.1f} s   (baseline)")
    print(f"    curve on   {on[0]:8.1f} img/s  wall {on[1]:7.1f} s   {on[2]} checkpoints scored")
    print(f"    ratio on/off: images/s {on[0] / off[0]:5.3f}   wall time {on[1] / off[1]:5.3f}")


if __name__ == "__main__":
    main()
