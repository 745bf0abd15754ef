"""Prefect flows: orchestration only. Each task calls one unit of work from tasks/.

train_pipeline: shard -> one task per training stage (each one Ray Train job) -> evaluate -> register -> promote.
evaluate_flow:  a checkpoint or registered model's checkpoint against a dataset.
promote_flow:   the champion gate for a registered version.

Shard and stage tasks are cached on content (shard params + source fingerprint +
manifest hash; stage params + upstream checkpoint hash + manifest hash) with
persisted results, so a re-run after a crash skips what is done; the interrupted
stage resumes from its latest checkpoint (tasks/train.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ganforge.tasks.params import Params, flatten, load_params
from ganforge.tasks.runtime import prefect_api_applied
from ganforge.tasks.secrets import redact

# Prefect reads its settings at import: apply runtime.prefect_api_url first (the CLI has already applied its
# own --set value; a value in params.yaml wins over PREFECT_API_URL, which wins over the default).
if not prefect_api_applied():
    try:
        _url = load_params().runtime.prefect_api_url
    except Exception:  # noqa: BLE001 - a broken params.yaml is reported by the flow, not at import
        _url = None
    if _url:
        os.environ["PREFECT_API_URL"] = _url
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.tasks import exponential_backoff  # noqa: E402


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    from ganforge.tasks.io import sha256_file

    return sha256_file(path) if path.exists() else "missing"


def source_fingerprint(source: str) -> str:
    """Cheap content fingerprint of a shard source: names, sizes and mtimes of a folder / zip."""
    p = Path(source)
    if p.is_dir():
        return _sha(sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()))
    if p.is_file():
        st = p.stat()
        return _sha([str(p), st.st_size, st.st_mtime_ns])
    return source  # digits / synthetic / torchvision names are their own content


def _shard_key(ctx, args: dict) -> str:
    params: Params = args["params"]
    return "shard-" + _sha([params.data.model_dump(mode="json"), source_fingerprint(params.data.source),
                            source_fingerprint(params.data.source_b) if params.data.source_b else None,
                            str(Path(params.data.shards).resolve())])


def _stage_key(ctx, args: dict) -> str:
    params: Params = args["params"]
    init = args.get("init")
    init_hash = _file_sha(Path(init) / "state.pt") if init else "scratch"
    from ganforge.tasks.train import identity

    return "stage-" + _sha([{**identity(params.train), "resolution": params.train.resolution}, args["stage_index"],
                            args["manifest_sha256"], init_hash, str(Path(params.train.out).resolve())])


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a crash or a lost worker; not an error that would only recur (bad params, damaged inputs)."""
    from ganforge.tasks.errors import is_retryable

    exc = getattr(state, "data", None)
    return not isinstance(exc, BaseException) or is_retryable(exc)


@task(name="shard", cache_key_fn=_shard_key, persist_result=True, retries=1, retry_condition_fn=_worth_retrying)
def shard_task(params: Params) -> dict:
    from ganforge.tasks.shard import manifest_hash, shard

    get_run_logger().info("sharding %s -> %s", params.data.source, params.data.shards)
    m = shard(params.data.source, params.data.shards, params.data)
    return {"shards": params.data.shards, "manifest_sha256": manifest_hash(params.data.shards), "count": m["count"],
            "skipped": len(m["skipped"])}


@task(name="train-stage", cache_key_fn=_stage_key, persist_result=True, retries=2, retry_condition_fn=_worth_retrying,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), task_run_name="train-stage-{stage_index}")
def stage_task(params: Params, stage_index: int, manifest_sha256: str, init: str | None) -> dict:
    from ganforge.models.families import get_family
    from ganforge.tasks.train import train_stage

    stage = get_family(params.train).stages()[stage_index]
    logger = get_run_logger()
    logger.info("stage %s (%dpx, %.1f kimg) from %s", stage.name, stage.resolution, stage.kimg, init or "scratch")
    art = create_progress_artifact(0.0, key=f"progress-{stage.name}".replace("_", "-"),
                                   description=f"training {stage.name}")

    def progress(frac: float) -> None:
        update_progress_artifact(art, 100.0 * frac)

    curve = None
    if params.eval.every_kimg:  # the FID curve, scored beside training
        from ganforge.tasks.curve import Curve

        curve = Curve(params, params.train.out)
    rec = train_stage(params.data.shards, params.train.out, params, stage_index, init=init, on_progress=progress,
                      curve=curve)
    return {"stage": stage.name, **rec}


@task(name="evaluate")
def evaluate_task(params: Params, checkpoint: str) -> dict:
    from ganforge.tasks.evaluate import evaluate

    out = Path(params.train.out) / "eval"
    return evaluate(checkpoint, params.data.shards, params.eval, out=out, runtime=params.runtime)


@task(name="register")
def register_task(params: Params, checkpoint: str, evaluation: dict, run_id: str, data_sha: str) -> dict:
    from ganforge.tasks.registry import register

    return register(checkpoint, evaluation, params, run_id, data_sha256=data_sha)


@task(name="promote")
def promote_task(params: Params, name: str, version: int | None, force: bool = False) -> dict:
    from ganforge.tasks.registry import PromotionRefused, promote

    try:
        return promote(name, version, params, force=force)
    except PromotionRefused as e:
        return {"name": name, "version": version, "promoted": False, "reason": str(e)}


def _recorded_stages(params: Params) -> dict[str, str]:
    """Stage -> final checkpoint, as summary.json of the run folder records them."""
    path = Path(params.train.out) / "summary.json"
    try:
        stages = json.loads(path.read_text()).get("stages", {})
    except (OSError, ValueError):
        return {}
    return {k: v["checkpoint"] for k, v in stages.items() if v.get("done") and v.get("checkpoint")}


def _stop_ray(flow, flow_run, state) -> None:
    """Cancelling the flow stops its Ray job."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


def _grid_markdown(path: Path) -> str:
    if not path.exists():
        return ""
    b64 = base64.b64encode(path.read_bytes()).decode()
    return f"\n\n![samples](data:image/png;base64,{b64})\n\n`{path.resolve()}`"


def resolve(params: Params | None, overrides: dict[str, Any] | None) -> Params:
    if params is None:
        return load_params(None, overrides or {})
    if overrides:
        return load_params(None, {**flatten(params.model_dump(mode="json")), **overrides})
    return params


_NOT_IN_TABLE = {"step", "kimg", "images_per_s"}


def _plain_console() -> None:
    """Prefect's console handler prints through rich with emoji codes on: ``photo:china:60`` would show a flag.
    Log lines name sources, paths and URIs, so they are printed as they are."""
    import logging

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            console = getattr(h, "console", None)
            if console is not None and hasattr(console, "_emoji"):
                console._emoji = False


@flow(name="train-pipeline", on_cancellation=[_stop_ray], on_crashed=[_stop_ray], log_prints=True)
def train_pipeline(params: Params | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Shard -> train every stage -> evaluate -> register -> promote, on params.yaml (overridable)."""
    from ganforge.models.families import get_family
    from ganforge.tasks.registry import log_training, start_pipeline_run
    from ganforge.tasks.train import prepared_dir
    from ganforge.tasks.runtime import init_ray

    params = resolve(params, overrides)
    _plain_console()
    logger = get_run_logger()
    init_ray(params.runtime)
    # a cached result is only valid while its output exists: recompute when the shards are gone
    missing = not (Path(params.data.shards) / "manifest.json").exists()
    shards = shard_task.with_options(refresh_cache=missing)(params)
    prev = None
    stage_recs = []
    recorded = _recorded_stages(params)
    for st in get_family(params.train).stages():
        # a cached preparation stage is only valid while its output shards exist, a cached training stage while its
        # final checkpoint is complete (a damaged one is trained again from the newest valid checkpoint)
        gone = st.kind == "prepare" and not (prepared_dir(Path(params.train.out), st) / "manifest.json").exists()
        if st.kind == "train" and st.name in recorded:
            from ganforge.tasks.checkpoint import checkpoint_problem

            problem = checkpoint_problem(recorded[st.name])
            if problem:
                logger.warning("stage %s: recorded checkpoint %s is damaged (%s): not using the cache", st.name,
                               recorded[st.name], problem)
                gone = True
        rec = stage_task.with_options(refresh_cache=gone)(params, st.index, shards["manifest_sha256"], prev)
        stage_recs.append(rec)
        prev = rec["checkpoint"]
    create_table_artifact(
        key="stage-metrics",
        table=[{"stage": r["stage"], "resolution": r["resolution"], "kimg": r["images_seen"] / 1000,
                "wall_time_s": r["wall_time_s"], "images_per_s": r["images_per_s"],
                **{k: round(v, 4) for k, v in r.get("last_metrics", {}).items() if k not in _NOT_IN_TABLE}}
               for r in stage_recs],
        description="per-stage training metrics",
    )
    run_id = start_pipeline_run(params, params.data.shards, run_name=Path(params.train.out).name)
    summary = json.loads((Path(params.train.out) / "summary.json").read_text())
    log_training(summary, params.train.out, params, run_id)
    from ganforge.tasks.curve import chosen_checkpoint

    last, prev = prev, chosen_checkpoint(params, prev)  # registry.checkpoint: last, or best on the curve
    evaluation = evaluate_task(params, prev)
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(evaluation["scores"])
        mlflow.set_tags({"eval.protocol": evaluation["protocol"], "eval.num_samples": evaluation["num_samples"],
                         "eval.reference_split": evaluation["reference"]["split"],
                         "eval.reference_count": evaluation["reference"]["count"]})
        mlflow.log_artifacts(str(Path(params.train.out) / "eval"), artifact_path="eval")
    reg = register_task(params, prev, evaluation, run_id, shards["manifest_sha256"])
    decision = promote_task(params, reg["name"], reg["version"])
    grid = Path(params.train.out) / "eval" / "samples.png"
    result = {
        "final_checkpoint": last, "checkpoint": prev, **evaluation["scores"], "scores": evaluation["scores"],
        "fid": evaluation.get("fid"), "kid": evaluation.get("kid"),
        "protocol": evaluation["protocol"], "num_samples": evaluation["num_samples"],
        "model": reg["name"], "version": reg["version"], "promoted": decision.get("promoted"),
        "decision": decision.get("reason"), "grid": str(grid.resolve()), "mlflow_run_id": run_id,
    }
    where = (f"{evaluation['protocol']}, {evaluation['num_samples']} samples vs {evaluation['reference']['count']} "
             f"{evaluation['reference']['split']}")
    create_markdown_artifact(
        key="pipeline-result",
        markdown=(f"# ganforge run `{Path(params.train.out).name}`\n\n"
                  f"| metric ({where}) | value | better |\n|---|---|---|\n"
                  + "".join(f"| {k} | {v:.5g} | {evaluation['directions'].get(k) or ''} |\n"
                            for k, v in evaluation["scores"].items()) + "\n"
                  f"Registered **{reg['name']}** version **{reg['version']}** (alias `challenger`); champion gate: "
                  f"**{'promoted' if decision.get('promoted') else 'not promoted'}** — {decision.get('reason')}"
                  + _grid_markdown(grid)),
        description="final metrics, registry decision and samples",
    )
    logger.info("pipeline done: %s", json.dumps(result))
    return result


@flow(name="evaluate")
def evaluate_flow(checkpoint: str | None = None, model_uri: str | None = None, params: Params | None = None,
                  overrides: dict[str, Any] | None = None) -> dict:
    """Evaluate a checkpoint, or the checkpoint behind a registered model (models:/NAME@alias)."""
    params = resolve(params, overrides)
    if checkpoint is None:
        if model_uri is None:
            raise ValueError("give a checkpoint or a model_uri")
        from mlflow import MlflowClient

        from ganforge.tasks.registry import setup_mlflow

        setup_mlflow(params.runtime)
        name, ref = model_uri.removeprefix("models:/").split("@" if "@" in model_uri else "/", 1)
        client = MlflowClient()
        mv = client.get_model_version_by_alias(name, ref) if "@" in model_uri else client.get_model_version(name, ref)
        checkpoint = mv.tags["checkpoint"]
    return evaluate_task(params, checkpoint)


@flow(name="promote")
def promote_flow(name: str | None = None, version: int | None = None, force: bool = False,
                 params: Params | None = None, overrides: dict[str, Any] | None = None) -> dict:
    params = resolve(params, overrides)
    name = name or params.registry.model_name or f"ganforge-{params.train.family}"
    return promote_task(params, name, version, force)


def redact_parameters(f):
    """Prefect stores a flow run's parameters and shows them in its UI: store them without any URI's
    credentials (runtime.mlflow_tracking_uri, s3_endpoint_url, ...). The run itself gets the values as given."""
    serialize = f.serialize_parameters
    f.serialize_parameters = lambda parameters: redact(serialize(parameters))
    return f


for _f in (train_pipeline, evaluate_flow, promote_flow):
    redact_parameters(_f)
