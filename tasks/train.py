"""`ganforge train`: every stage of a family in order, each one Ray Train job.

Stage k starts from stage k-1's final checkpoint (grown by the family); inside a
stage, a restarted worker group continues from the stage's latest checkpoint
(``ray.train.get_checkpoint()``); a re-run of ``train`` on the same RUN_DIR skips
finished stages (``summary.json``) and resumes the interrupted one from the
latest complete checkpoint found in its storage folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from ray.train import UserCallback

from ganforge.models.family import StageSpec
from ganforge.models.families import get_family

from ganforge.tasks.checkpoint import GRID, META, STATE, checkpoint_dir, checkpoint_problem, latest_checkpoint
from ganforge.tasks.console import StageProgress, progress_enabled, verbose
from ganforge.tasks.errors import CheckpointError, StageError, one_line, root_cause
from ganforge.tasks.history import numeric_keys, read_history, record_report
from ganforge.tasks.io import hold, write_json
from ganforge.tasks.loop import ROWS, ray_train_loop
from ganforge.tasks.params import Params, ParamsError, flatten
from ganforge.tasks.runtime import init_ray
from ganforge.tasks.secrets import redact
from ganforge.tasks.shard import manifest_hash, read_manifest, verify_shards
from ganforge.tasks.storage import arrow_fs, is_remote

log = logging.getLogger("ganforge.train")

SUMMARY = "summary.json"


def identity(tp) -> dict:
    """Parameters that change what a checkpoint means: a RUN_DIR resumes only with the same values."""
    d = tp.model_dump(mode="json")
    return {k: d[k] for k in ("family", "batch_size", "seed", tp.family)}


def identity_changes(stored: dict, now: dict, limit: int = 6) -> str:
    """What differs between a run's stored identity and this one's, key by key:
    ``train.batch_size: 32 in the run, 16 now``."""
    a, b = flatten(stored, "train."), flatten(now, "train.")
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {json.dumps(a.get(k, '<unset>'))} in the run, {json.dumps(b.get(k, '<unset>'))} now"
             for k in keys[:limit]]
    return "; ".join(parts + ([f"and {len(keys) - limit} more"] if len(keys) > limit else []))


def storage_root(params: Params, run_dir: Path) -> str:
    """Ray Train storage for this run: runtime.ray_storage/<run name>, or RUN_DIR/ray by default."""
    base = params.runtime.ray_storage
    if not base:
        return str((run_dir / "ray").resolve())
    if "://" in base:
        return f"{base.rstrip('/')}/{run_dir.name}"
    return str((Path(base) / run_dir.name).resolve())


def _open_run(shards: str | Path, out: str | Path, params: Params) -> tuple[Path, dict, str]:
    """Validate shards vs params, load or start RUN_DIR/summary.json, refuse a mismatched run."""
    tp = params.train
    family = get_family(tp)
    manifest = read_manifest(shards)
    if tp.resolution > manifest["resolution"]:
        raise ValueError(
            f"train.resolution ({tp.resolution}) exceeds the shards' resolution ({manifest['resolution']}) in {shards}"
        )
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    ident = identity(tp)
    summary_path = run_dir / SUMMARY
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("identity") != ident:
            raise ParamsError(f"{run_dir} holds a run with other training parameters ({identity_changes(summary.get('identity') or {}, ident)}); "
                              f"use a new --out or restore those parameters")
    else:
        summary = {"family": family.name, "identity": ident, "stages": {}, "final_checkpoint": None}
    summary["data"] = {"shards": str(shards), "manifest_sha256": manifest_hash(shards)}
    summary["params"] = redact(params.model_dump(mode="json"))  # no credential of a URI lands on disk
    storage = storage_root(params, run_dir)
    summary["storage"] = storage
    return run_dir, summary, storage


def train_stage(shards: str | Path, out: str | Path, params: Params, stage_index: int, *,
                init: str | None = None, on_progress=None, verify: bool | None = None, curve=None) -> dict:
    """Run (or skip, when finished, or resume, when interrupted) one stage; returns its summary record.

    ``init``: the previous stage's final checkpoint (default: from summary.json). The run folder is held by
    this process meanwhile: a second run on it is refused (BusyError), naming this one.
    """
    with hold(out, "training"):
        return _train_stage(shards, out, params, stage_index, init=init, on_progress=on_progress, verify=verify,
                            curve=curve)


def _train_stage(shards: str | Path, out: str | Path, params: Params, stage_index: int, *,
                 init: str | None, on_progress, verify: bool | None, curve) -> dict:
    run_dir, summary, storage = _open_run(shards, out, params)
    family = get_family(params.train)
    stage = family.stages()[stage_index]
    rec = summary["stages"].get(stage.name)
    if rec and rec.get("done") and stage.kind == "train":
        problem = checkpoint_problem(rec["checkpoint"])
        if problem is None:
            log.info("stage %s already finished: %.3f kimg, %s", stage.name, rec.get("images_seen", 0) / 1000,
                     rec["checkpoint"])
            export_stage(run_dir, stage.name, rec)
            return rec
        log.warning("stage %s: its final checkpoint %s is damaged (%s): training the stage again from its newest "
                    "valid checkpoint", stage.name, rec["checkpoint"], problem)
    if init is None and stage_index > 0:
        prev = family.stages()[stage_index - 1]
        prev_rec = summary["stages"].get(prev.name)
        if not prev_rec or not prev_rec.get("done"):
            raise ValueError(f"stage {stage.name} needs stage {prev.name} to have finished first")
        init = prev_rec["checkpoint"]
    if init and "://" not in str(init):
        if not Path(init, STATE).exists():
            raise FileNotFoundError(f"initial checkpoint {init} (previous stage) has no {STATE}")
        init = str(Path(init).resolve())  # Ray workers run in their own working directory
    if init:
        problem = checkpoint_problem(init)
        if problem:
            raise CheckpointError(f"initial checkpoint {init} (the previous stage's) is damaged: {problem}; train the "
                                  f"previous stage again (`ganforge train` re-runs it)")
    check_before_ray(params, stage, shards, full_verify=verify)
    if stage.kind == "prepare":
        summary["stages"][stage.name] = prepare_stage(params, stage, shards, run_dir, init, on_progress)
    else:
        if stage.info.get("prepared"):
            shards = _prepared_shards(run_dir, stage)
        resume = latest_checkpoint(storage, stage)
        finished = _finished_checkpoint(resume, stage)
        if finished is not None:  # stopped after the stage's last checkpoint, before summary.json was written
            log.info("stage %s: its latest checkpoint %s already completes it", stage.name, resume)
            summary["stages"][stage.name] = finished
        else:
            run_one_stage(params, stage, shards, run_dir, storage, init=init, resume=resume, summary=summary,
                          on_progress=on_progress, curve=curve)
        summary["stages"][stage.name]["notes"] = family.notes(stage)
        export_stage(run_dir, stage.name, summary["stages"][stage.name])
    last = get_family(params.train).stages()[-1]
    if stage.name == last.name:
        summary["final_checkpoint"] = summary["stages"][stage.name]["checkpoint"]
    # re-read and merge: another stage task may have written meanwhile
    path = run_dir / SUMMARY
    if path.exists():
        on_disk = json.loads(path.read_text())
        on_disk["stages"].update(summary["stages"])
        summary["stages"] = on_disk["stages"]
    write_json(path, summary)
    return summary["stages"][stage.name]


def check_before_ray(params: Params, stage: StageSpec, shards, *, full_verify: bool | None = None) -> None:
    """Everything that can fail for certain is checked here, on the driver, before a Ray job starts (Ray would
    otherwise retry it, then bury the cause): the batch split, the shards against their manifest, and the family
    against the data (labels for a conditional model, a labelled subset for a semi-supervised one)."""
    tp = params.train
    if stage.kind == "train" and tp.batch_size % tp.workers:
        raise ParamsError(f"train.batch_size ({tp.batch_size}) must be divisible by train.workers ({tp.workers})")
    if not stage.info.get("prepared"):  # prepared data is checked by its stage and its stream
        manifest = verify_shards(shards, full=full_verify)
        try:
            get_family(tp).check_data(manifest, shards)
        except ValueError as e:
            raise ParamsError(str(e)) from None


def _finished_checkpoint(ckpt: str | None, stage: StageSpec) -> dict | None:
    """The stage record for ``ckpt`` when that checkpoint already holds all of the stage's images."""
    if ckpt is None:
        return None
    with checkpoint_dir(ckpt) as d:
        meta = json.loads((Path(d) / META).read_text())
    if meta.get("images_in_stage", 0) < int(round(stage.kimg * 1000)):
        return None
    return {"done": True, "index": stage.index, "resolution": stage.resolution, "checkpoint": ckpt,
            "images_seen": meta["images_in_stage"], "wall_time_s": 0.0, "images_per_s": None,
            "last_metrics": {k: v for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))},
            "resumed_from": ckpt}


def prepared_dir(run_dir: Path, stage: StageSpec) -> Path:
    """Where a preparation stage writes, and a later stage with ``info["prepared"]`` reads: RUN_DIR/<output>."""
    return run_dir / (stage.info.get("output") or stage.info.get("prepared") or stage.name)


def _prepared_shards(run_dir: Path, stage: StageSpec) -> Path:
    path = prepared_dir(run_dir, stage)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"stage {stage.name} trains on {stage.info['prepared']}, but {path} has none: run the "
                                f"stage that prepares them first")
    return path


def prepare_stage(params: Params, stage: StageSpec, shards, run_dir: Path, init: str | None, on_progress=None) -> dict:
    """Encode every shard with the previous stage's modules (idempotent: same inputs, same output)."""
    from ganforge.tasks.prepare import prepare

    if not init:
        raise ValueError(f"stage {stage.name} needs the checkpoint of the stage before it")
    workers = int(stage.info.get("workers", 1))
    if workers > 1:
        init_ray(params.runtime)
    out = prepared_dir(run_dir, stage)
    t0 = time.perf_counter()
    m = prepare(init, stage.index, shards, out, workers=workers, progress=progress_enabled(), runtime=params.runtime)
    wall = time.perf_counter() - t0
    if on_progress is not None:
        on_progress(1.0)
    log.info("stage %s: %d samples (%s) in %.1fs", stage.name, m["count"], m.get("kind"), wall)
    return {
        "done": True, "index": stage.index, "resolution": stage.resolution, "kind": "prepare",
        "output": out.name, "checkpoint": init,  # the next stage starts from the modules that prepared the data
        "shards": str(out.resolve()), "manifest_sha256": manifest_hash(out),
        "images_seen": m["count"], "wall_time_s": round(wall, 2), "images_per_s": round(m["count"] / max(wall, 1e-6), 1),
        "last_metrics": {f"{split}_{k}": v for split, e in m["splits"].items()
                         for k, v in e.items() if isinstance(v, float)},
    }


def export_stage(run_dir: Path, stage_name: str, rec: dict) -> Path:
    """A fixed-path copy of a stage's final checkpoint (RUN_DIR/stages/<stage>) and its loss history as
    CSV (RUN_DIR/plots/<stage>.csv): what DVC tracks as the stage's outputs and plots."""
    import csv
    import shutil

    dst = run_dir / "stages" / stage_name
    if not (dst / STATE).exists() or json.loads((dst / META).read_text()).get("images_in_stage") != rec["images_seen"]:
        tmp = dst.with_name(f".{stage_name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with checkpoint_dir(rec["checkpoint"]) as d:
            shutil.copytree(d, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    hist = read_history(run_dir, stage_name)
    if hist:
        (run_dir / "plots").mkdir(exist_ok=True)
        keys = numeric_keys(hist)
        with open(run_dir / "plots" / f"{stage_name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(hist)
    return dst


def train(shards: str | Path, out: str | Path, params: Params, *, verify: bool | None = None, curve=None) -> dict:
    """Run (or resume) every stage in order; returns the summary (also RUN_DIR/summary.json)."""
    stages = get_family(params.train).stages()
    prev = None
    with hold(out, "training"):
        for stage in stages:
            prev = train_stage(shards, out, params, stage.index, init=prev, verify=verify, curve=curve)["checkpoint"]
        summary = json.loads((Path(out) / SUMMARY).read_text())
        summary["final_checkpoint"] = prev
        write_json(Path(out) / SUMMARY, summary)
    return summary


def run_one_stage(params: Params, stage: StageSpec, shards, run_dir: Path, storage: str, *, init: str | None,
                  resume: str | None, summary: dict, on_progress=None, curve=None) -> str:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    init_ray(params.runtime)
    tp = params.train
    log.info("stage %s (%dpx, %.3f kimg) on %d worker(s)%s; worker logs: %s", stage.name, stage.resolution,
             stage.kimg, tp.workers, f", resuming from {resume}" if resume else "", (run_dir / "logs").resolve())
    for k, v in get_family(tp).notes(stage).items():
        log.warning("stage %s: %s %s", stage.name, k, v)
    config = {
        "params": tp.model_dump(mode="json"), "stage": stage.index, "shards": shards if is_remote(shards) else str(Path(shards).resolve()),
        "run_dir": str(run_dir.resolve()), "init": init, "resume": resume,
        "threads": max(1, int(tp.cpus_per_worker)), "stage_name": stage.name, "verbose": verbose(),
        "report_interval_s": tp.report_interval_s, "storage": storage,
    }
    use_gpu = tp.gpus_per_worker > 0
    resources = {"CPU": tp.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = tp.gpus_per_worker
    storage_fs, storage_path = arrow_fs(storage) if is_remote(storage) else (None, storage)
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tp.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tp.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tp.checkpoints_to_keep),
            callbacks=[ReportForwarder(reports)],
        ),
    )
    t0 = time.perf_counter()
    try:
        try:
            result = _fit_recording(trainer, reports, run_dir, stage, storage, on_progress, curve)
        finally:
            reports.shutdown()
    except Exception as e:  # ray.train.TrainingFailedError and friends: checkpoints so far are kept
        cause = root_cause(e)
        raise StageError(
            f"stage {stage.name} failed after {tp.max_failures} restart(s) ({one_line(cause)}); its checkpoints are "
            f"kept in {storage} and a re-run resumes from the newest valid one", cause) from e
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"stage {stage.name} failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name} finished without a checkpoint")
    ckpt = result.checkpoint.path
    if is_remote(storage):
        ckpt = f"{storage.split('://')[0]}://{ckpt.lstrip('/')}" if "://" not in ckpt else ckpt
    elif not ckpt.startswith("/"):
        ckpt = str(Path(ckpt).resolve())
    m = result.metrics or {}
    images = int(round(float(m.get("kimg", stage.kimg)) * 1000))
    summary["stages"][stage.name] = {
        "done": True, "index": stage.index, "resolution": stage.resolution, "checkpoint": ckpt,
        "images_seen": images, "wall_time_s": round(wall, 2), "images_per_s": round(images / wall, 1) if wall else None,
        "last_metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))},
        "resumed_from": resume,
    }
    log.info("stage %s done: %.3f kimg in %.1fs; checkpoint %s", stage.name, images / 1000, wall, ckpt)
    return ckpt


class ReportForwarder(UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's report (and the persisted checkpoint's path) of every
    ``ray.train.report`` to the driver through a Ray queue. The driver records them in the run folder and
    drives the progress display, so no folder has to be shared with workers on other hosts."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and metrics[0]:
            self.queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))


def _fit_recording(trainer, queue, run_dir: Path, stage: StageSpec, storage: str, on_progress, curve=None):
    """trainer.fit() in a thread while this thread records the forwarded reports, calls
    ``on_progress(fraction)`` and offers checkpoints to the FID curve (tasks/curve.py, scored beside training);
    returns fit's result or raises its error."""
    import threading
    from queue import Empty

    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    fs, _ = arrow_fs(storage)

    def drain(timeout: float) -> None:
        while True:
            try:
                metrics, ckpt_path = queue.get(timeout=timeout)
            except Empty:
                return
            timeout = 0.05
            grid = None
            if ckpt_path is not None:
                try:
                    with fs.open_input_file(f"{ckpt_path}/{GRID}") as f:
                        grid = f.read()
                except (OSError, FileNotFoundError):
                    log.warning("stage %s: checkpoint %s has no %s", stage.name, ckpt_path, GRID)
            rows = metrics.pop(ROWS, None) or [metrics]  # the rows since the previous report; the last is this one
            for row in rows[:-1]:
                record_report(run_dir, stage.name, row)
            record_report(run_dir, stage.name, metrics, grid)
            display.update(metrics)
            if curve is not None:
                curve.offer(stage, metrics, ckpt_path, storage)
            if on_progress is not None and "kimg" in metrics:
                on_progress(min(1.0, float(metrics["kimg"]) / stage.kimg))

    display = StageProgress(stage.name, stage.resolution, stage.kimg)
    th = threading.Thread(target=target, name=f"fit-{stage.name}", daemon=True)
    th.start()
    try:
        while th.is_alive():
            drain(1.0)
            if curve is not None:
                curve.poll()
        drain(0.05)  # reports put before fit returned
    finally:
        display.close()
    if curve is not None and "error" not in box:
        curve.finish()  # the stage's scores: its last checkpoint's is what `registry.checkpoint: best` may pick
    if "error" in box:
        raise box["error"]
    if on_progress is not None:
        on_progress(1.0)
    return box["result"]
