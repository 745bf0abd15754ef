"""The sweep flow: a Ray Tune search over params (tasks/sweep.py) as a Prefect flow.

shard (only when the shards are missing) -> the Tune experiment (resumed when OUT has one) -> MLflow (a sweep run, one
child run per trial) -> a table artifact of the trials, best first, and the metric-vs-kimg plot of every trial
-> optionally: the best trial's best checkpoint evaluated on the full protocol and registered (alias
``challenger``; the champion gate is not applied: ``ganforge promote`` does that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ganforge.flows.pipeline import (
    _grid_markdown, _plain_console, _stop_ray, evaluate_task, redact_parameters, register_task, resolve,
    shard_task,
)
from ganforge.tasks.params import Params

from prefect import flow, get_run_logger, task  # noqa: E402  (after pipeline: it points Prefect at its API)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402


@task(name="tune-sweep")
def sweep_task(params: Params, space: dict, out: str, num_samples: int, max_concurrent: int | None,
               stages: int | None, grace_kimg: float | None, reduction_factor: float) -> dict:
    from ganforge.tasks.sweep import sweep

    return sweep(params, space, out, num_samples=num_samples, max_concurrent=max_concurrent, stages=stages,
                 grace_kimg=grace_kimg, reduction_factor=reduction_factor)


@task(name="log-sweep")
def log_sweep_task(summary: dict, params: Params) -> dict:
    from ganforge.tasks.sweep import log_sweep

    return log_sweep(summary, params)


@flow(name="sweep", on_cancellation=[_stop_ray], on_crashed=[_stop_ray], log_prints=True)
def sweep_flow(space: dict[str, dict[str, list]], out: str = "runs/sweep", num_samples: int = 1,
               max_concurrent: int | None = None, stages: int | None = None, grace_kimg: float | None = None,
               reduction_factor: float = 2.0, register: bool = False, params: Params | None = None,
               overrides: dict[str, Any] | None = None) -> dict:
    """Search params with Ray Tune (ASHA on the curve beside training); ``space`` maps params keys to
    ``{"grid"|"choice"|"loguniform"|"uniform": [...]}``. Running it again on the same ``out`` resumes it."""
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.shard import manifest_hash
    from ganforge.tasks.sweep import BEST_PARAMS, space_from, trial_params

    params = resolve(params, overrides)
    _plain_console()
    logger = get_run_logger()
    init_ray(params.runtime)
    if (Path(params.data.shards) / "manifest.json").exists():  # trials read the shards: never rewritten under them
        logger.info("using the shards in %s", params.data.shards)
        shards = {"manifest_sha256": manifest_hash(params.data.shards)}
    else:
        shards = shard_task.with_options(refresh_cache=True)(params)
    space = space_from(space, "space")
    summary = sweep_task(params, space, out, num_samples, max_concurrent, stages, grace_kimg, reduction_factor)
    ids = log_sweep_task(summary, params)
    metric = summary["metric"]
    keys = list(space)
    create_table_artifact(
        key="sweep-trials",
        table=[{"trial": t["trial_id"], **{k: t[k] for k in keys}, f"best {metric}": t[f"best_{metric}"],
                "at kimg": t["best_kimg"], "kimg": round(t["kimg"], 3), "status": t["status"]}
               for t in summary["trials"]],
        description=f"trials of {out}, best {metric} first",
    )
    best = summary.get("best")
    result = {"out": summary["out"], "metric": metric, "trials": len(summary["trials"]),
              "stopped_early": sum(t["status"] == "stopped early" for t in summary["trials"]),
              "best": {k: best[k] for k in ("trial_id", f"best_{metric}", "best_kimg", "checkpoint", *keys)}
              if best else None,
              "best_params": str(Path(summary["out"]) / BEST_PARAMS) if best else None,
              "mlflow_run_id": ids["sweep"]}
    text = (f"# sweep `{Path(summary['out']).name}`: {len(summary['trials'])} trials, "
            f"{result['stopped_early']} stopped early by ASHA\n\n")
    if best:
        text += (f"Best: **{best['trial_id']}** ({', '.join(f'`{k}` = {best[k]!r}' for k in keys)}): {metric} "
                 f"**{best[f'best_{metric}']:.5g}** at {best['best_kimg']:.3g} kimg. Train it in full with "
                 f"`ganforge pipeline --params {result['best_params']}`.")
    create_markdown_artifact(key="sweep-result", markdown=text + _grid_markdown(Path(summary["out"]) / "sweep.png"),
                             description="the sweep's best trial and every trial's curve")
    if register and best:
        tparams = trial_params(summary["out"], best)
        evaluation = evaluate_task(tparams, best["checkpoint"])
        reg = register_task(tparams, best["checkpoint"], evaluation, ids[best["trial_id"]],
                            shards["manifest_sha256"])
        result["registered"] = {"name": reg["name"], "version": reg["version"], "alias": params.registry.challenger_alias}
        logger.info("registered the best trial's checkpoint as %s version %s (alias %s)", reg["name"], reg["version"],
                    params.registry.challenger_alias)
    logger.info("sweep done: %s", json.dumps(result, default=str))
    return result


redact_parameters(sweep_flow)
