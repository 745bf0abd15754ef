"""An FID-versus-kimg curve scored beside training, not inside it.

With ``eval.every_kimg`` set, the driver of a training stage hands each checkpoint that crosses the interval
(and each stage's last one) to a Ray task with its own resources (``eval.resources``): the checkpoint's files
travel through Ray's object store, so the task may run on another node and Ray Train may delete the
checkpoint meanwhile. The task scores it with ``eval.every_num_samples`` samples on ``eval.every_protocol``.
Results arrive while training goes on; the curve spans every stage of a chain on a cumulative kimg axis:

- ``RUN_DIR/metrics/curve.jsonl`` (one line per scored checkpoint), ``RUN_DIR/plots/curve.csv`` (DVC plot)
  and ``RUN_DIR/curve.png`` next to ``loss_curves.png``; MLflow gets it as a metric history per stage run;
- the best checkpoint by the curve's first metric is copied to ``RUN_DIR/best`` (``best.json`` says which),
  what ``registry.checkpoint: best`` registers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ganforge.models.families import get_family
from ganforge.tasks.evaluate import direction, evaluate
from ganforge.tasks.params import Params
from ganforge.tasks.storage import arrow_fs

log = logging.getLogger("ganforge.curve")

CURVE = "curve.jsonl"
BEST = "best"


def curve_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics" / CURVE


def read_curve(run_dir: str | Path) -> list[dict]:
    path = curve_path(run_dir)
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # torn by a killed writer
            continue
        rows[(r["stage"], r["stage_kimg"])] = r  # a re-scored checkpoint (resumed run) replaces its line
    return sorted(rows.values(), key=lambda r: r["kimg"])


def _score(files: dict[str, bytes], shards: str, eval_params: dict, threads: int) -> dict[str, float]:
    """Runs as a Ray task: write the checkpoint's files to a temp folder and score them."""
    import torch

    from ganforge.tasks.params import EvalParams

    torch.set_num_threads(max(1, threads))
    with tempfile.TemporaryDirectory(prefix="ganforge-curve-") as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        return evaluate(d, shards, EvalParams.model_validate(eval_params), progress=False)["scores"]


class Curve:
    """The driver's side: offered every checkpoint report, submits the ones on the interval, collects."""

    def __init__(self, params: Params, run_dir: str | Path, shards: str | Path | None = None):
        ev = params.eval
        self.params, self.run_dir = params, Path(run_dir)
        self.every = float(ev.every_kimg)
        cache = ev.cache_dir if "://" in ev.cache_dir else str(Path(ev.cache_dir).resolve())  # tasks run elsewhere
        self.eval_params = ev.model_copy(update={
            "num_samples": ev.every_num_samples, "protocol": ev.every_protocol or ev.protocol,
            "metrics": ev.every_metrics, "workers": 1, "cache_dir": cache}).model_dump(mode="json")
        self.metric = ev.every_metrics[0]
        self.higher = direction(self.metric) == "higher"
        stages = get_family(params.train).stages()
        self.offset, total = {}, 0.0
        for s in stages:
            self.offset[s.name] = total
            total += s.kimg
        self.pending: list[tuple[Any, dict]] = []
        self.shares_cores = False
        shards = str(shards or params.data.shards)
        self.shards = shards if "://" in shards else str(Path(shards).resolve())
        done = read_curve(self.run_dir)
        self.next_kimg = (max(r["kimg"] for r in done) // self.every + 1) * self.every if done else self.every

    def offer(self, stage, metrics: dict, ckpt_path: str | None, storage: str) -> None:
        """A checkpoint report of ``stage``: score it when it crosses the interval or ends the stage. A
        checkpoint that cannot be handed over leaves a gap in the curve, never a failed stage."""
        if ckpt_path is None or "kimg" not in metrics:
            return
        try:
            self._offer(stage, metrics, ckpt_path, storage)
        except Exception as e:  # noqa: BLE001
            log.warning("curve: checkpoint %s of %s not scored: %s: %s", ckpt_path, stage.name, type(e).__name__, e)

    def _offer(self, stage, metrics: dict, ckpt_path: str, storage: str) -> None:
        stage_kimg = float(metrics["kimg"])
        kimg = self.offset.get(stage.name, 0.0) + stage_kimg
        last = stage_kimg >= stage.kimg - 1e-9
        if kimg + 1e-9 < self.next_kimg and not last:
            return
        while self.next_kimg <= kimg + 1e-9:
            self.next_kimg += self.every
        import ray

        fs, _ = arrow_fs(storage)
        files = {}
        for name in ("state.pt", "meta.json"):
            with fs.open_input_file(f"{ckpt_path}/{name}") as f:
                files[name] = f.read()
        res = self.params.eval.resources
        cpus = res.cpus
        if cpus > ray.available_resources().get("CPU", 0) and not res.gpus:
            if not self.shares_cores:
                log.warning("the curve's scoring finds no free CPU beside training: it shares the training cores "
                            "(training slows while it runs); on a cluster give it its own (eval.resources)")
            self.shares_cores, cpus = True, 0
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # never inside the caller's placement group (a Tune trial's, which reserves nothing for it)
        task = ray.remote(num_cpus=cpus, num_gpus=res.gpus, max_retries=1, scheduling_strategy=(
            PlacementGroupSchedulingStrategy(placement_group=None)))(_score)
        ref = task.remote(ray.put(files), self.shards, self.eval_params, max(1, int(res.cpus)))
        self.pending.append((ref, {"stage": stage.name, "stage_kimg": round(stage_kimg, 6), "kimg": round(kimg, 6),
                                   "step": int(round(kimg * 1000)), "checkpoint": ckpt_path, "files": files}))

    def poll(self, wait: bool = False) -> None:
        """Record the scores that arrived (all of them with ``wait``)."""
        import ray

        while self.pending:
            refs = [r for r, _ in self.pending]
            ready, _ = ray.wait(refs, num_returns=len(refs) if wait else 1, timeout=None if wait else 0)
            if not ready:
                return
            for ref in ready:
                i = refs.index(ref)
                _, rec = self.pending.pop(i)
                refs.pop(i)
                files = rec.pop("files")
                try:
                    scores = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a failed scoring leaves a gap, not a failed stage
                    log.warning("curve: scoring %s at %.3f kimg failed: %s", rec["stage"], rec["kimg"], e)
                    continue
                self._record({**rec, **scores}, files)
            if not wait:
                return

    def _record(self, row: dict, files: dict[str, bytes]) -> None:
        path = curve_path(self.run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        value = row.get(self.metric)
        log.info("curve: %s %.4g at %.3f kimg (%s)", self.metric, value if value is not None else float("nan"),
                 row["kimg"], row["stage"])
        best = self.best()
        if value is not None and best is not None and best["kimg"] == row["kimg"]:
            dst = self.run_dir / BEST
            tmp = self.run_dir / f".{BEST}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            shutil.rmtree(dst, ignore_errors=True)
            tmp.replace(dst)
            (self.run_dir / "best.json").write_text(json.dumps(
                {"checkpoint": str(dst.resolve()), "source": row["checkpoint"], "kimg": row["kimg"],
                 "stage": row["stage"], "metric": self.metric, "value": value}, indent=1))

    def best(self) -> dict | None:
        rows = [r for r in read_curve(self.run_dir) if r.get(self.metric) is not None]
        if not rows:
            return None
        return (max if self.higher else min)(rows, key=lambda r: r[self.metric])

    def finish(self) -> None:
        """Wait for the stage's scores; write the DVC plot and the PNG."""
        self.poll(wait=True)
        write_curve_outputs(self.run_dir)


def write_curve_outputs(run_dir: str | Path) -> Path | None:
    """RUN_DIR/plots/curve.csv and RUN_DIR/curve.png from the curve so far."""
    import csv

    run_dir = Path(run_dir)
    rows = read_curve(run_dir)
    if not rows:
        return None
    keys = ["kimg", "stage"] + sorted({k for r in rows for k, v in r.items()
                                       if isinstance(v, (int, float)) and k not in ("kimg", "step", "stage_kimg")})
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "plots" / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in keys[2:]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False, layout="constrained")
    for ax, m in zip(axes[0], metrics):
        pts = [(r["kimg"], r[m]) for r in rows if r.get(m) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1, ms=3)
        for st in dict.fromkeys(r["stage"] for r in rows):
            first = min(r["kimg"] - r["stage_kimg"] for r in rows if r["stage"] == st)
            ax.axvline(first, color="grey", lw=0.5)
            ax.text(first, ax.get_ylim()[1], st.split("-")[-1], fontsize=7, va="top")
        ax.set_xlabel("kimg (cumulative over stages)")
        ax.set_ylabel(m)
    out = run_dir / "curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def chosen_checkpoint(params: Params, last: str) -> str:
    """What evaluation and registration use: ``last``, or with ``registry.checkpoint: best`` the best on the
    curve (RUN_DIR/best) when there is one."""
    if params.registry.checkpoint != "best":
        return last
    path = Path(params.train.out) / "best.json"
    if not path.exists():
        log.warning("registry.checkpoint is best but %s has no curve (set eval.every_kimg): using the last "
                    "checkpoint", params.train.out)
        return last
    best = json.loads(path.read_text())
    log.info("the best checkpoint on the curve: %s %.4g at %.3f kimg (%s)", best["metric"], best["value"],
             best["kimg"], best["stage"])
    return best["checkpoint"]
