"""`ganforge sweep`: a search over params as a Ray Tune experiment.

Each trial is the family's stage chain (or its first ``stages``), every stage one Ray Train job as in
``ganforge train``, in its own run folder (``OUT/trials/<trial id>``). Trials are compared on the curve scored
beside training (``eval.every_kimg``, tasks/curve.py): every scored checkpoint is a Tune report of the curve's
first metric at its cumulative kimg, and ASHA stops the trials that fall behind at its rungs.

A search space maps params keys to one of ``grid: [..]`` (every value), ``choice: [..]`` (one at random per
sample), ``loguniform: [lo, hi]`` or ``uniform: [lo, hi]``; a plain list is a grid. Every value a space can
produce is validated against params before Ray starts.

OUT holds Tune's experiment (``OUT/tune``), the trials' run folders, ``sweep.json`` (what was asked),
``trials.json`` / ``trials.csv`` (one row per trial, best first), ``sweep.png`` (the metric against kimg for
every trial) and ``best-params.yaml``: the swept params with the best trial's values, a file that
``ganforge pipeline --params`` and ``ganforge train --params`` take. Running the same sweep on the same OUT
again resumes it (``Tuner.restore``): finished trials are not run again, an interrupted one continues from its
stages' checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ganforge.tasks.curve import Curve, read_curve
from ganforge.tasks.evaluate import direction
from ganforge.tasks.io import write_json
from ganforge.tasks.params import Params, ParamsError, _set_path, flatten, read_yaml, validate_params

log = logging.getLogger("ganforge.sweep")

KINDS = ("grid", "choice", "loguniform", "uniform")
TUNE_DIR, TRIALS_DIR = "tune", "trials"
BEST_PARAMS = "best-params.yaml"
NOT_SWEPT = ("data.", "runtime.", "train.out", "eval.every_kimg", "eval.every_metrics")


# ----------------------------------------------------------------------------- the search space


def _values(text: str, flag: str) -> tuple[str, list]:
    if "=" not in text:
        raise ParamsError(f"--{flag} expects KEY=V1,V2,..., got {text!r}")
    key, raw = text.split("=", 1)
    vals = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not key.strip() or not vals:
        raise ParamsError(f"--{flag} expects KEY=V1,V2,..., got {text!r}")
    return key.strip(), vals


def space_from(raw: Any, origin: str) -> dict[str, dict[str, list]]:
    """A search space as a mapping of params keys to ``{grid|choice|loguniform|uniform: [...]}`` (a plain list is
    a grid), checked for shape: one line naming the key otherwise."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: a sweep space is a mapping of params keys to grid/choice/loguniform/uniform")
    space: dict[str, dict[str, list]] = {}
    for key, spec in raw.items():
        if isinstance(spec, (list, tuple)):
            spec = {"grid": spec}
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ParamsError(f"{origin}: {key}: give exactly one of {', '.join(KINDS)} (got {spec!r})")
        (kind, vals), = spec.items()
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        if not vals:
            raise ParamsError(f"{origin}: {key}: {kind} needs at least one value")
        if kind in ("loguniform", "uniform"):
            if len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) \
                    or not vals[0] < vals[1] or (kind == "loguniform" and vals[0] <= 0):
                raise ParamsError(f"{origin}: {key}: {kind} takes two numbers LOW < HIGH"
                                  f"{' (both > 0)' if kind == 'loguniform' else ''}, got {vals}")
        space[str(key)] = {kind: vals}
    if not space:
        raise ParamsError("the sweep has an empty search space: give --space FILE or --grid / --choice / "
                          "--loguniform / --uniform KEY=...")
    return space


def parse_space(file: str | None = None, grid: list[str] = (), choice: list[str] = (),
                loguniform: list[str] = (), uniform: list[str] = ()) -> dict[str, dict[str, list]]:
    """The search space from a YAML file (the mapping of :func:`space_from`, optionally under a top-level
    ``space:``) and the ``--grid`` / ``--choice`` / ``--loguniform`` / ``--uniform KEY=V1,V2`` flags (which win)."""
    raw: dict[str, Any] = {}
    origin = "sweep space"
    if file:
        loaded = read_yaml(file, "sweep space file")
        loaded = loaded.get("space", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, dict):
            raise ParamsError(f"{file}: a sweep space is a mapping of params keys to grid/choice/loguniform/uniform")
        raw, origin = dict(loaded), file
    for kind, items in (("grid", grid), ("choice", choice), ("loguniform", loguniform), ("uniform", uniform)):
        for text in items:
            key, vals = _values(text, kind)
            raw[key] = {kind: vals}
    return space_from(raw, origin)


def check_space(base: dict, space: dict[str, dict[str, list]]) -> None:
    """Every key a params key that a sweep may vary, and every value the space can take valid params (the
    ends of a range stand for it): one line naming the key and value otherwise, before any compute."""
    known = flatten(Params().model_dump(mode="json"))
    for key, spec in space.items():
        if key.startswith(NOT_SWEPT):
            raise ParamsError(f"sweep space {key}: not swept (trials share the shards, the runtime, the run folder "
                              f"layout and the curve they are compared on)")
        if key not in known:
            raise ParamsError(f"sweep space {key}: not a params key")
        (kind, vals), = spec.items()
        for v in vals:
            raw = json.loads(json.dumps(base))
            _set_path(raw, key, v)
            try:
                validate_params(raw, f"sweep space {key}={v!r}")
            except ParamsError as e:
                raise ParamsError(" ".join(str(e).split())) from None


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "loguniform": lambda v: tune.loguniform(*v),
            "uniform": lambda v: tune.uniform(*v)}
    return {key: make[kind](vals) for key, spec in space.items() for kind, vals in spec.items()}


def trial_count(space: dict[str, dict[str, list]], num_samples: int) -> int:
    return num_samples * math.prod(len(s["grid"]) for s in space.values() if "grid" in s)


def with_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    raw = json.loads(json.dumps(base))
    for k, v in overrides.items():
        _set_path(raw, k, v)
    return raw


# ----------------------------------------------------------------------------- one trial


class TuneCurve(Curve):
    """The curve of one trial: each scored checkpoint is also a Tune report (the metric at cumulative kimg).
    The trial's last point is held back until the trial has written its records: ASHA stops a trial that
    reaches its last rung or ``max_t`` at that report, and Tune then ends the trial's process at once."""

    final_kimg = math.inf
    held: dict | None = None

    def _record(self, row: dict, files: dict[str, bytes]) -> None:
        super()._record(row, files)
        if row["kimg"] >= self.final_kimg - 1e-9:
            self.held = row
        else:
            report(self.metric, row, self.run_dir)


REPORTED = "reported.jsonl"  # in a trial's folder: every point Tune was given, in order


def reported(run_dir: str | Path) -> list[dict]:
    """The points of a trial that Tune saw (once each, by kimg)."""
    path = Path(run_dir) / REPORTED
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # torn by a killed trial
            continue
        rows[r["kimg"]] = r
    return [rows[k] for k in sorted(rows)]


def report(metric: str, row: dict, run_dir: Path) -> None:
    """One point to Tune (and to the trial's record of what Tune saw, first: Tune may end the trial at once)."""
    from ray import tune

    if row.get(metric) is None:
        return
    point = {metric: float(row[metric]), "kimg": float(row["kimg"]), "stage": row["stage"]}
    with open(run_dir / REPORTED, "a") as f:
        f.write(json.dumps(point) + "\n")
    tune.report(point)


def _asha():
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        """ASHA whose rungs survive a restored sweep. Tune restores a scheduler as it was pickled when the sweep
        started (empty), and does not run finished or stopped trials again: their points would be missing from
        the rungs, and a resumed sweep would let through trials the first run would have stopped. So the first
        result after (re)start fills the rungs from every trial's record of what Tune saw (``reported.jsonl``):
        at each rung, a trial's first point at or past it, as ASHA records it."""

        def __init__(self, out: str, **kw):
            super().__init__(**kw)
            self.out, self.seeded = out, False

        def on_trial_result(self, tune_controller, trial, result):
            if not self.seeded:
                self.seeded = True
                for path in sorted((Path(self.out) / TRIALS_DIR).glob(f"*/{REPORTED}")):
                    points = reported(path.parent)
                    if path.parent.name == trial.trial_id:  # this result is already in its record: ASHA judges it
                        points = [p for p in points if p["kimg"] < result[self._time_attr] - 1e-9]
                    for bracket in self._brackets:
                        for milestone, recorded in bracket._rungs:
                            first = next((p for p in points if p["kimg"] >= milestone), None)
                            if first is not None and path.parent.name not in recorded:
                                recorded[path.parent.name] = self._metric_op * first[self._metric]
            return super().on_trial_result(tune_controller, trial, result)

        def __getstate__(self):
            return {**self.__dict__, "seeded": False}  # a restored copy fills its rungs again

    return ResumableASHA


def run_trial(config: dict, *, base: dict, shards: str, out: str, stages: int) -> None:
    """Tune's trainable: this trial's stages in ``OUT/trials/<trial id>``, resumed when the folder has them.
    A resumed trial first reports again what its curve already holds, so ASHA sees its whole history."""
    from ray import tune

    from ganforge.models.families import get_family
    from ganforge.tasks.train import train_stage

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(out) / TRIALS_DIR / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(config["overrides"])
    raw = with_overrides(base, overrides)
    raw.setdefault("train", {})["out"] = str(run_dir)
    params = validate_params(raw, f"trial {trial_id}")
    record = {"trial_id": trial_id, "overrides": overrides, "status": "running"}
    write_json(run_dir / "trial.json", record)
    chain = get_family(params.train).stages()[:stages]
    curve = TuneCurve(params, run_dir, shards)
    curve.final_kimg = sum(s.kimg for s in chain)
    seen = {r["kimg"] for r in reported(run_dir)}
    for row in read_curve(run_dir):  # a restarted trial: what was scored but never reached Tune
        if row["kimg"] >= curve.final_kimg - 1e-9:
            curve.held = row
        elif row["kimg"] not in seen:
            report(curve.metric, row, run_dir)
    prev = None
    try:
        for st in chain:
            prev = train_stage(shards, run_dir, params, st.index, init=prev, curve=curve)["checkpoint"]
    except Exception as e:
        from ganforge.tasks.errors import one_line

        write_json(run_dir / "trial.json", {**record, "status": f"error: {one_line(e)}"})
        raise
    write_json(run_dir / "trial.json", {**record, "status": "completed", "checkpoint": prev})
    if curve.held is not None:
        report(curve.metric, curve.held, run_dir)


# ----------------------------------------------------------------------------- the experiment


def _resources_per_trial(params: Params) -> int:
    """How many trials fit at once: the cluster's CPUs (GPUs when trials use them) over one trial's workers."""
    import ray

    tp = params.train
    total = ray.cluster_resources()
    if tp.gpus_per_worker:
        return max(1, int(total.get("GPU", 0) // (tp.workers * tp.gpus_per_worker)))
    return max(1, int(total.get("CPU", 1) // (tp.workers * tp.cpus_per_worker)))


def check_sweep(params: Params, space: dict[str, dict[str, list]], num_samples: int = 1,
                stages: int | None = None) -> int:
    """Everything about a sweep that can be refused before Prefect or Ray start; returns the stage count."""
    from ganforge.models.families import get_family

    if not params.eval.every_kimg:
        raise ParamsError("ganforge sweep compares trials on the curve beside training: set eval.every_kimg "
                          "(e.g. --set eval.every_kimg=0.5)")
    if num_samples < 1:
        raise ParamsError(f"--num-samples must be at least 1, got {num_samples}")
    check_space(params.model_dump(mode="json"), space)
    chain = get_family(params.train).stages()
    stages = len(chain) if stages is None else stages
    if not 1 <= stages <= len(chain):
        raise ParamsError(f"--stages {stages}: family {params.train.family} has {len(chain)} stages "
                          f"({', '.join(s.name for s in chain)})")
    return stages


def sweep(params: Params, space: dict[str, dict[str, list]], out: str | Path, *, num_samples: int = 1,
          max_concurrent: int | None = None, stages: int | None = None, grace_kimg: float | None = None,
          reduction_factor: float = 2.0, seed: int = 0) -> dict:
    """Run (or resume) the sweep; returns the summary written to OUT/sweep.json with the trials, best first."""
    from ray import tune

    from ganforge.models.families import get_family
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import read_manifest

    stages = check_sweep(params, space, num_samples, stages)
    ev = params.eval
    base = params.model_dump(mode="json")
    chain = get_family(params.train).stages()
    shards = params.data.shards
    read_manifest(shards)  # missing or damaged shards: one line now, not in every trial
    shards = shards if "://" in shards else str(Path(shards).resolve())
    out = Path(out).resolve()
    metric = ev.every_metrics[0]
    mode = "max" if direction(metric) == "higher" else "min"
    max_kimg = sum(s.kimg for s in chain[:stages])
    grace = grace_kimg or ev.every_kimg
    asked = {"space": space, "num_samples": num_samples, "stages": stages, "metric": metric, "mode": mode,
             "grace_kimg": grace, "reduction_factor": reduction_factor, "max_kimg": max_kimg,
             "family": params.train.family, "seed": seed}
    sweep_json = out / "sweep.json"
    if sweep_json.exists():
        before = json.loads(sweep_json.read_text())
        if before.get("asked") != json.loads(json.dumps(asked)):
            raise ParamsError(f"{out} holds another sweep ({before.get('asked')}); use a new --out or ask for "
                              f"the same sweep to resume it")
        changed = sorted(k for k, v in flatten(base).items() if not k.startswith("runtime.")
                         and flatten(before.get("base", {})).get(k, v) != v)
        if changed:
            raise ParamsError(f"{out} holds this sweep with other params ({', '.join(changed[:5])} differ): its "
                              f"finished trials would not compare; use a new --out or restore those params")
    out.mkdir(parents=True, exist_ok=True)
    write_json(sweep_json, {"asked": asked, "base": base})
    # Tune saves its experiment state at most every 10 s by default: a driver killed sooner would lose the
    # record of trials that finished meanwhile (their folders stay, so nothing is trained again, but Tune would
    # start them anew). Saving a local experiment's state takes milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no configuration box, no result tables
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a trial's closing result has no score
    init_ray(params.runtime)
    fits = _resources_per_trial(params)
    concurrent = max_concurrent or fits
    if concurrent > fits:
        log.warning("--max-concurrent %d: only %d trial(s) of %d worker(s) fit this Ray cluster at once; the others "
                    "wait for room", concurrent, fits, params.train.workers)
    # A trial only drives its Ray Train jobs, whose workers ask for their own CPUs/GPUs: it reserves nothing that
    # training needs (Tune refuses an empty reservation, hence one byte of memory).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, shards=shards, out=str(out), stages=stages),
        {"cpu": 0, "memory": 1})
    exp = out / TUNE_DIR
    if tune.Tuner.can_restore(str(exp)):
        log.info("resuming the sweep in %s: finished trials stay as they are", out)
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True)
    else:
        n = trial_count(space, num_samples)
        log.info("sweep of %d trial(s) over %s, %d at a time; ASHA on %s (%s) from %.3g kimg, rungs x%g, up to "
                 "%.3g kimg", n, ", ".join(space), concurrent, metric, mode, grace, reduction_factor, max_kimg)
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": tune_space(space)},
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=num_samples,
                search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrent),
                scheduler=_asha()(str(out), time_attr="kimg", max_t=max_kimg, grace_period=grace,
                                  reduction_factor=reduction_factor)),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out), verbose=0),
        )
    tuner.fit()
    return summarize(out, asked)


def summarize(out: Path, asked: dict) -> dict:
    """OUT/trials.json and .csv (best first), OUT/sweep.png and OUT/best-params.yaml from the trials' folders."""
    metric, mode, max_kimg = asked["metric"], asked["mode"], asked["max_kimg"]
    trials = []
    for d in sorted((out / TRIALS_DIR).glob("*/trial.json")):
        rec = json.loads(d.read_text())
        seen = reported(d.parent)
        reached = max((p["kimg"] for p in seen), default=0.0)
        if rec["status"].startswith("error"):
            status = rec["status"]
        elif reached >= max_kimg - 1e-9:
            status = "completed"
        else:  # Tune ended the trial before its last point: ASHA stopped it
            status = "stopped early"
        rows = [r for r in read_curve(d.parent) if r.get(metric) is not None and r["kimg"] <= reached + 1e-9]
        best = (max if mode == "max" else min)(rows, key=lambda r: r[metric]) if rows else None
        trials.append({"trial_id": rec["trial_id"], **rec["overrides"], f"best_{metric}": best[metric] if best else None,
                       "best_kimg": best["kimg"] if best else None, f"last_{metric}": rows[-1][metric] if rows else None,
                       "kimg": reached, "status": status, "run_dir": str(d.parent),
                       "checkpoint": str(d.parent / "best") if best else None,
                       "curve": [[r["kimg"], r[metric]] for r in rows]})
    key = f"best_{metric}"
    sign = -1 if mode == "max" else 1
    trials.sort(key=lambda t: (t[key] is None, sign * (t[key] or 0.0)))
    summary = {"out": str(out), "metric": metric, "mode": mode, "trials": trials,
               "best": trials[0] if trials and trials[0][key] is not None else None}
    write_json(out / "trials.json", summary)
    _write_csv(out / "trials.csv", trials)
    plot_sweep(out / "sweep.png", trials, metric, list(asked["space"]))
    if summary["best"] is not None:
        write_best_params(out / BEST_PARAMS, json.loads((out / "sweep.json").read_text())["base"],
                          summary["best"], list(asked["space"]), out)
    return summary


def _write_csv(path: Path, trials: list[dict]) -> None:
    import csv

    keys = [k for k in trials[0] if k not in ("curve",)] if trials else ["trial_id"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(trials)


def plot_sweep(path: Path, trials: list[dict], metric: str, keys: list[str]) -> Path | None:
    if not any(t["curve"] for t in trials):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for i, t in enumerate(trials):
        if not t["curve"]:
            continue
        xs, ys = zip(*t["curve"])
        values = " ".join(f"{k.rsplit('.', 1)[-1]}={t[k]:.3g}" if isinstance(t[k], float) else f"{k.rsplit('.', 1)[-1]}={t[k]}"
                          for k in keys)
        label = f"{t['trial_id']} {values} ({t['status'].split(':')[0]})"
        ax.plot(xs, ys, marker="o", lw=2.2 if i == 0 else 1, ms=3, label=label,
                ls="-" if t["status"] == "completed" else "--")
    ax.set_xlabel("kimg (cumulative over stages)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (best first; dashed: stopped early)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_best_params(path: Path, base: dict, best: dict, keys: list[str], out: Path) -> Path:
    """The swept params with the best trial's values: a params file for ``ganforge pipeline --params``. The
    runtime section is left out (where things run is the user's, from their params.yaml or environment)."""
    raw = with_overrides(base, {k: best[k] for k in keys})
    raw.pop("runtime", None)
    raw["train"]["out"] = str(out / "best-run")
    header = (f"# ganforge sweep {out}: the best trial, {best['trial_id']} ({best.get('status')}), by its curve\n"
              + "".join(f"#   {k}: {best[k]!r}\n" for k in keys)
              + "# train.out points at a new run folder; runtime comes from your params.yaml / environment\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def trial_params(out: str | Path, trial: dict) -> Params:
    """The params a trial ran with (its values on the sweep's base, its own run folder)."""
    asked = json.loads((Path(out) / "sweep.json").read_text())
    raw = with_overrides(asked["base"], {k: trial[k] for k in asked["asked"]["space"]})
    raw["train"]["out"] = trial["run_dir"]
    return validate_params(raw, f"trial {trial['trial_id']}")


# ----------------------------------------------------------------------------- MLflow


def log_sweep(summary: dict, params: Params) -> dict[str, str]:
    """The sweep as an MLflow run with one child run per trial (its values as params, its curve as the metric's
    history keyed by images, its status); the plot, the table and the best params file as artifacts. Logged
    again from the folder on every run of the sweep (a resumed one replaces its children). Returns the run
    ids: ``sweep`` and one per trial id."""
    import mlflow

    from ganforge.tasks.registry import setup_mlflow

    out = Path(summary["out"])
    asked = json.loads((out / "sweep.json").read_text())["asked"]
    metric = summary["metric"]
    exp_id = setup_mlflow(params.runtime)
    ids_path = out / "mlflow.json"
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    client = mlflow.MlflowClient()
    parent = ids.get("sweep")
    if parent is not None:
        try:
            client.get_run(parent)
        except Exception:  # noqa: BLE001 - another tracking store, or the run was deleted: start a new one
            parent = None
    if parent is None:
        run = client.create_run(exp_id, run_name=f"sweep-{out.name}", tags={
            "ganforge.sweep": str(out), "ganforge.family": params.train.family})
        parent = run.info.run_id
        client.log_batch(parent, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in {
            "sweep.space": json.dumps(asked["space"]), "sweep.num_samples": asked["num_samples"],
            "sweep.stages": asked["stages"], "sweep.metric": metric, "sweep.mode": asked["mode"],
            "sweep.grace_kimg": asked["grace_kimg"], "sweep.reduction_factor": asked["reduction_factor"],
            "sweep.max_kimg": asked["max_kimg"], "train.family": params.train.family}.items()])
    out_ids = {"sweep": parent}
    old = {r.data.tags.get("ganforge.trial_id"): r.info.run_id for r in mlflow.search_runs(
        experiment_ids=[exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")}
    for t in summary["trials"]:
        if t["trial_id"] in old:
            client.delete_run(old[t["trial_id"]])
        child = client.create_run(exp_id, run_name=t["trial_id"], tags={
            "mlflow.parentRunId": parent, "ganforge.trial_id": t["trial_id"], "status": t["status"],
            "run_dir": t["run_dir"], **({"checkpoint": t["checkpoint"]} if t["checkpoint"] else {})})
        cid = child.info.run_id
        client.log_batch(cid, params=[mlflow.entities.Param(k, str(t[k])) for k in asked["space"]])
        import time

        now = int(time.time() * 1000)
        history = [mlflow.entities.Metric(metric, float(v), now, int(round(k * 1000))) for k, v in t["curve"]]
        if t[f"best_{metric}"] is not None:
            history.append(mlflow.entities.Metric(f"best_{metric}", float(t[f"best_{metric}"]), now, 0))
        history.append(mlflow.entities.Metric("kimg", float(t["kimg"]), now, 0))
        for i in range(0, len(history), 900):
            client.log_batch(cid, metrics=history[i:i + 900])
        client.set_terminated(cid, "FAILED" if t["status"].startswith("error") else "FINISHED")
        out_ids[t["trial_id"]] = cid
    for name in ("sweep.png", "trials.csv", "trials.json", BEST_PARAMS):
        if (out / name).exists():
            client.log_artifact(parent, str(out / name))
    best = summary.get("best")
    if best:
        client.log_metric(parent, f"best_{metric}", float(best[f"best_{metric}"]))
        client.set_tag(parent, "best_trial", best["trial_id"])
    client.set_terminated(parent, "FINISHED")
    write_json(ids_path, out_ids)
    return out_ids
