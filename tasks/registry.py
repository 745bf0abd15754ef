"""MLflow tracking, the model registry and the promotion gate.

- One MLflow run per pipeline run with a nested run per stage (params flattened,
  git commit, data manifest hash, metric history with steps, sample grids, loss
  curves), logged by the task after ``fit()`` from rank 0's history files.
- The EMA generator is registered as a pyfunc model that loads offline and turns
  seeds (and optional class labels and the family's own truncation) into uint8 images.
- New versions get the ``challenger`` alias; ``champion`` moves only when
  the gate's number (``registry.gate_metric``; by default the family's: FID,
  lower is better, for generators, accuracy, higher, for classifiers), measured with the same protocol,
  sample count and reference data, improves by at least
  ``registry.min_improvement``. Decisions are written as tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ganforge.tasks.checkpoint import load_generator
from ganforge.tasks.errors import GanforgeError, InputError, RegistryError
from ganforge.tasks.export import export_model, predict, predict_images  # noqa: F401 - predict*: legacy models
from ganforge.tasks.history import read_history
from ganforge.tasks.io import sha256_file, sha256_json
from ganforge.tasks.secrets import redact
from ganforge.tasks.params import Params, RuntimeParams, flatten

log = logging.getLogger("ganforge.registry")

COMPARABLE_TAGS = ("protocol", "num_samples", "reference_sha256", "reference_split", "reference_count")


class PromotionRefused(GanforgeError, ValueError):
    """The gate refused to move the champion alias; the message says why."""

    exit_code = 3
    retryable = False


def _retry(fn, *args, tries: int = 8, **kwargs):
    """sqlite under parallel writers can report 'database is locked': retry with back-off."""
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if "locked" not in str(e).lower() or i == tries - 1:
                raise
            time.sleep(0.2 * 2**i)


_ANNOUNCED: set[str] = set()


def setup_mlflow(runtime: RuntimeParams) -> str:
    """Point MLflow at the configured store and make sure the experiment exists (returns its id)."""
    import mlflow

    from ganforge.tasks.storage import configure_s3

    configure_s3(runtime.s3_endpoint_url)  # artifacts on s3:// go to the configured endpoint
    uri = runtime.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri not in _ANNOUNCED:
        _ANNOUNCED.add(uri)
        log.info("MLflow: %s (from %s)", redact(uri), runtime.source("mlflow_tracking_uri"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with _sqlite_first_use_lock(uri):  # two first users of a fresh sqlite store would both create its tables
        exp = _retry(mlflow.get_experiment_by_name, runtime.mlflow_experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        root = runtime.mlflow_artifact_root
        if "://" in root:
            location = root
        elif uri.startswith(("http://", "https://")):
            location = None  # a tracking server decides (e.g. --artifacts-destination s3://...)
        else:
            location = Path(root).resolve().as_uri()
        try:
            exp_id = _retry(mlflow.create_experiment, runtime.mlflow_experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - another writer created it first
            exp_id = mlflow.get_experiment_by_name(runtime.mlflow_experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)  # nested runs land beside their parent
    return exp_id


@contextlib.contextmanager
def _sqlite_first_use_lock(uri: str):
    """An exclusive lock beside a sqlite store while it is opened (and, on first use, created); a tracking
    server creates its own schema once, so no lock is needed there."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:////") else uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


GATE_LOCK_SUFFIX = ".gate-lock"


@contextlib.contextmanager
def gate_lock(client, name: str, *, timeout_s: float = 120.0, stale_s: float = 600.0):
    """A mutex around the champion gate of ``name`` that works on sqlite and on a tracking server alike: the
    registry's own unique-name constraint (creating the registered model ``<name>.gate-lock`` succeeds for one
    caller only). A lock left by a crashed holder is broken after ``stale_s``."""
    import os
    import socket

    lock = f"{name}{GATE_LOCK_SUFFIX}"
    me = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": me, "since": repr(time.time())},
                                           description=f"held while the champion gate of {name} decides")
            break
        except Exception as e:  # noqa: BLE001 - taken by someone else (RESOURCE_ALREADY_EXISTS) or a busy store
            text = str(e)
            if "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower():
                # MLflow's SQL store answers a duplicate name by reading the existing model for its message; when
                # the holder released the lock in between, that read fails: taken a moment ago, free now
                continue
            if "already exists" not in text.lower() and "RESOURCE_ALREADY_EXISTS" not in text \
                    and "locked" not in text.lower():
                raise
            try:
                held = client.get_registered_model(lock)
                # its age by the store's own creation time (written with the row), not by a tag or this host's
                # clock: a lock read without its tags must not look 600 s old and be broken under its holder
                age = time.time() - held.creation_timestamp / 1000.0
                if held.creation_timestamp and age > stale_s:
                    again = client.get_registered_model(lock)
                    if again.creation_timestamp == held.creation_timestamp:  # still the same stale lock
                        log.warning("breaking the stale gate lock of %s held by %s for %.0f s", name,
                                    held.tags.get("owner"), age)
                        client.delete_registered_model(lock)
                    continue
            except Exception:  # noqa: BLE001 - released meanwhile
                continue
            if time.monotonic() > deadline:
                raise RegistryError(f"the champion gate of {name} is locked by {held.tags.get('owner')}; if that "
                                    f"process is gone, delete the registered model {lock}") from None
            time.sleep(delay)
            delay = min(1.0, delay * 2)
    try:
        yield
    finally:
        try:
            _retry(client.delete_registered_model, lock)
        except Exception as e:  # noqa: BLE001 - the decision is made; a lock someone else removed is no failure
            if "not found" not in str(e).lower() and "RESOURCE_DOES_NOT_EXIST" not in str(e):
                raise
            log.warning("the gate lock of %s was removed by another process while %s held it", name, me)


def _model_version(client, name: str, version: int | str | None = None, alias: str | None = None):
    """A registered version by number or alias, or RegistryError naming what does not exist."""
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except Exception as e:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        known = ", ".join(str(v.version) for v in _existing_versions(client, name)) or "none"
        raise RegistryError(f"registered model {name} has no {what} (versions: {known})") from e


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


_CURVES = {"loss_d": "tab:red", "loss_g": "tab:blue", "loss_rec": "tab:green", "loss_prior": "tab:purple"}


def loss_curve_png(run_dir: Path, stages: list[str], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    offset = 0.0
    colors: dict[str, str] = {}
    for st in stages:
        h = read_history(run_dir, st)
        if not h:
            continue
        x = [offset + r["kimg"] for r in h]
        keys = [k for k in dict.fromkeys(k for r in h for k in r) if k.startswith("loss")]  # every family's losses
        for key in keys:
            first = key not in colors
            colors.setdefault(key, _CURVES.get(key) or f"C{len(colors) % 10}")
            ax.plot(x, [r.get(key, np.nan) for r in h], color=colors[key], lw=1, label=key if first else None)
        ax.axvline(offset, color="grey", lw=0.5)
        ax.text(offset, 1.0, st.split("-")[-1], fontsize=7, va="top", transform=ax.get_xaxis_transform())
        offset = x[-1]
    if not colors:
        plt.close(fig)
        return None
    ax.set_xlabel("kimg (cumulative over stages)")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def log_training(summary: dict, run_dir: str | Path, params: Params, parent_run_id: str) -> None:
    """Nested runs per stage with metric history, grids and the checkpoint location."""
    import mlflow

    run_dir = Path(run_dir)
    with mlflow.start_run(run_id=parent_run_id):
        for name, rec in summary["stages"].items():
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.set_tags({"stage": name, "resolution": rec["resolution"], "checkpoint": rec["checkpoint"],
                                 **{f"note.{k}": v for k, v in (rec.get("notes") or {}).items()}})
                if rec.get("kind") == "prepare":  # its output's tag prefix: the folder's name (VQ-GAN: tokens)
                    out = rec.get("output", "prepared")
                    mlflow.log_metrics(rec["last_metrics"])
                    mlflow.set_tags({f"{out}.shards": rec["shards"], f"{out}.manifest_sha256": rec["manifest_sha256"]})
                mlflow.log_params({"stage_index": rec["index"], "resolution": rec["resolution"]})
                for r in read_history(run_dir, name):
                    mlflow.log_metrics({k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "step"},
                                       step=int(r["step"]))
                mlflow.log_metrics({"wall_time_s": rec["wall_time_s"], "stage_images_per_s": rec["images_per_s"] or 0})
                for png in sorted((run_dir / "samples").glob(f"{name}-*.png")):
                    mlflow.log_artifact(str(png), artifact_path="samples")
        curve = loss_curve_png(run_dir, list(summary["stages"]), run_dir / "loss_curves.png")
        if curve:
            mlflow.log_artifact(str(curve), artifact_path="plots")
        _log_fid_curve(run_dir, summary)
        _log_figures(summary, run_dir, params)


def _log_figures(summary: dict, run_dir: Path, params: Params) -> None:
    """The family's figures of the final checkpoint (StyleGAN: style mixing, truncation sweep, interpolation)
    in RUN_DIR/figures, logged beside the samples: ``figures/`` on the pipeline run and ``samples/`` on the last
    stage's run."""
    import mlflow

    from ganforge.tasks.figures import write_figures

    from ganforge.models.families import family_class
    from ganforge.models.family import GANFamily

    final = summary.get("final_checkpoint")
    if not final or family_class(params.train.family).figures is GANFamily.figures:  # nothing to draw
        return
    seeds = [params.train.seed * 1_000_003 + i for i in range(12)]
    try:
        pngs = write_figures(final, run_dir / "figures", seeds)
    except Exception as e:  # noqa: BLE001 - pictures must not fail a run whose stages all trained
        log.warning("figures of %s could not be drawn (%s: %s); training and its records are complete", final,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return
    if not pngs:
        return
    for png in pngs:
        mlflow.log_artifact(str(png), artifact_path="figures")
    last = list(summary["stages"])[-1]
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{mlflow.active_run().info.run_id}' and "
                                            f"tags.stage = '{last}'", output_format="list")
    if runs:
        with mlflow.start_run(run_id=runs[0].info.run_id, nested=True):
            for png in pngs:
                mlflow.log_artifact(str(png), artifact_path="samples")
    log.info("figures of %s: %s", final, ", ".join(p.name for p in pngs))


def _log_fid_curve(run_dir: Path, summary: dict) -> None:
    """The curve scored beside training (eval.every_kimg): a metric history keyed by cumulative images on the
    pipeline run and on each stage's run (``<metric>`` vs step), its PNG and the best checkpoint."""
    import mlflow

    from ganforge.tasks.curve import read_curve, write_curve_outputs
    from ganforge.tasks.metrics import METRICS

    rows = read_curve(run_dir)
    if not rows:
        return
    stage_runs = {r.data.tags.get("stage"): r.info.run_id for r in mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{mlflow.active_run().info.run_id}'", output_format="list")}
    for r in rows:
        values = {k: float(v) for k, v in r.items() if k in METRICS and v is not None}
        mlflow.log_metrics({f"curve_{k}": v for k, v in values.items()}, step=r["step"])
        if r["stage"] in stage_runs:
            with mlflow.start_run(run_id=stage_runs[r["stage"]], nested=True):
                mlflow.log_metrics(values, step=r["step"])
    png = write_curve_outputs(run_dir)
    if png:
        mlflow.log_artifact(str(png), artifact_path="plots")
    best = run_dir / "best.json"
    if best.exists():
        b = json.loads(best.read_text())
        mlflow.set_tags({"curve.best_kimg": b["kimg"], "curve.best_stage": b["stage"],
                         f"curve.best_{b['metric']}": b["value"], "curve.best_checkpoint": b["checkpoint"]})



def start_pipeline_run(params: Params, shards: str | Path, run_name: str | None = None) -> str:
    import mlflow

    from ganforge.tasks.shard import manifest_hash

    exp_id = setup_mlflow(params.runtime)
    run = _retry(mlflow.start_run, experiment_id=exp_id, run_name=run_name)
    try:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, tuple)) else redact(v)
                           for k, v in flatten(params.model_dump(mode="json")).items()})
        tags = {"ganforge.family": params.train.family, "data.manifest_sha256": manifest_hash(shards),
                "data.shards": str(shards)}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        mlflow.set_tags(tags)
    finally:
        mlflow.end_run()
    return run.info.run_id


# ----------------------------------------------------------------------------- the pyfunc model

# The registered model is logged from code (tasks/pyfunc_model.py, see ganforge.tasks.export). Models logged
# before that are cloudpickles of a class that calls ganforge.tasks.checkpoint.load_generator and this
# module's ``predict``: both names stay so those models keep loading (tests/fixtures/legacy_pyfunc).
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def sample_registered(model_uri: str, seeds: list[int], truncation: float = 1.0,
                      labels: list[int] | None = None) -> np.ndarray:
    import mlflow.pyfunc
    import pandas as pd

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MlflowException for an unknown name / version / alias
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower() or "No such" in str(e):
            raise RegistryError(f"no registered model at {model_uri}: {str(e).splitlines()[0][:200]}") from None
        raise
    frame = {"seed": seeds, "truncation": [truncation] * len(seeds)}
    if labels is not None:
        frame["label"] = labels
    return np.asarray(model.predict(pd.DataFrame(frame)))


def register(checkpoint: str, evaluation: dict | None, params: Params, run_id: str, *, data_sha256: str) -> dict:
    """Log the EMA generator as a pyfunc in ``run_id``, register a new version, alias it challenger, tag it."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    family, stage, ema, _ = load_generator(checkpoint)  # the checkpoint, not params, says what it is
    if evaluation and evaluation.get("checkpoint") and not same_checkpoint(evaluation["checkpoint"], checkpoint):
        raise InputError(f"the evaluation was made for checkpoint {evaluation['checkpoint']}, not {checkpoint}: "
                         f"evaluate this checkpoint (`ganforge evaluate --checkpoint {checkpoint}`) and register with "
                         f"that evaluation")
    setup_mlflow(params.runtime)
    name = params.registry.model_name or f"ganforge-{family.name}"
    scores = {k: repr(float(v)) for k, v in evaluation_scores(evaluation).items()}
    scores_sha = sha256_json(scores)
    for mv in _existing_versions(MlflowClient(), name):
        if mv.tags.get("checkpoint") == str(checkpoint) and mv.tags.get("scores_sha256") == scores_sha:
            log.info("%s version %s already holds %s with these metrics: not registering again", name, mv.version, checkpoint)
            return {"name": name, "version": int(mv.version), "model_uri": f"models:/{name}/{mv.version}",
                    "tags": dict(mv.tags), "existing": True}
    if family.product == "generator":
        example = pd.DataFrame({"seed": [0, 1], "truncation": [1.0, 0.7 if family.supports_truncation else 1.0]})
        if family.num_classes:
            example["label"] = [0, min(1, family.num_classes - 1)]
        # seed is required; label and truncation are optional columns (a frame of seeds alone is a valid input)
        inputs = Schema([ColSpec("long", "seed"), ColSpec("double", "truncation", required=False),
                         ColSpec("long", "label", required=False)])
    else:  # translator / classifier: uint8 images in
        example = _example_images(params, stage.resolution, family)
        inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *example.shape[1:]))])
    out_example = predict(family, stage, ema, example)
    # a two-domain translator's direction is a param of predict (its default: the first direction)
    param_schema = ParamSchema([ParamSpec("direction", "string", next(iter(family.directions)))]) \
        if family.directions else None
    signature = ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(out_example.dtype, (-1, *out_example.shape[1:]))]),
                               params=param_schema)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="ganforge-export-") as tmp:
        # models-from-code: the model's code is a file, its weights are data (nothing is pickled)
        info = _retry(
            mlflow.pyfunc.log_model, name="generator", python_model=str(MODEL_CODE),
            artifacts=export_model(checkpoint, tmp), signature=signature, input_example=example,
            pip_requirements=["ganforge", "torch==2.14.1", "torchvision==0.29.1"],
        )
        grid = _log_grid(checkpoint, stage.name)
    client = MlflowClient()
    try:
        _retry(client.create_registered_model, name)
    except Exception as e:  # noqa: BLE001
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    # model_id: a tracking server refuses a models:/m-... source without it (sqlite stores do not check)
    mv = _retry(client.create_model_version, name, info.model_uri, run_id=run_id,
                model_id=getattr(info, "model_id", None))
    tags = {"run_id": run_id, "data_sha256": data_sha256, "checkpoint": str(checkpoint), "scores_sha256": scores_sha,
            "family": family.name, "stage": stage.name, "resolution": str(stage.resolution),
            "product": family.product}
    if evaluation:
        tags.update({
            "protocol": evaluation["protocol"], "num_samples": str(evaluation["num_samples"]),
            "reference_sha256": evaluation["reference"]["manifest_sha256"],
            "reference_split": evaluation["reference"]["split"],
            "reference_count": str(evaluation["reference"]["count"]),
        })
        tags.update(scores)
    for k, v in tags.items():
        _retry(client.set_model_version_tag, name, mv.version, k, v)
    _retry(client.update_model_version, name, mv.version,
           description=version_description(family, stage, evaluation, data_sha256, run_id, grid, params))
    _retry(client.set_registered_model_alias, name, params.registry.challenger_alias, mv.version)
    log.info("registered %s version %s (alias %s)", name, mv.version, params.registry.challenger_alias)
    return {"name": name, "version": int(mv.version), "model_uri": f"models:/{name}/{mv.version}", "tags": tags}


def _log_grid(checkpoint: str, stage: str) -> str | None:
    """The checkpoint's sample grid as an artifact of the active run; its artifact path."""
    import mlflow

    from ganforge.tasks.checkpoint import GRID, checkpoint_dir

    with checkpoint_dir(str(checkpoint)) as d:
        src = Path(d) / GRID
        if not src.exists():
            return None
        path = f"registered/{stage}-{GRID}"
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / f"{stage}-{GRID}"
            dst.write_bytes(src.read_bytes())
            _retry(mlflow.log_artifact, str(dst), artifact_path="registered")
    return path


def version_description(family, stage, evaluation: dict | None, data_sha256: str, run_id: str, grid: str | None,
                        params: Params) -> str:
    """What the registry page shows for a version (markdown): what it is, on what data, how good, a grid."""
    metric, direction = gate_for(params.registry, family.name)
    lines = [f"**{family.name}** {family.product}, {stage.resolution}×{stage.resolution} (stage `{stage.name}`)"
             + (f", {family.num_classes} classes" if family.num_classes else ""),
             f"Data: manifest sha256 `{data_sha256[:16]}…`"]
    if evaluation:
        sc = evaluation_scores(evaluation)
        shown = " · ".join(f"{k.upper() if k in ('fid', 'kid', 'is') else k} **{v:.4g}**" for k, v in sc.items()
                           if v is not None and k in ("fid", "kid", "is", "intra_fid", "rfid", "precision", "recall",
                                                      "density", "coverage", "accuracy", "baseline_accuracy",
                                                      "codebook_usage"))
        ref = evaluation["reference"]
        lines.append(f"{shown} (protocol {evaluation['protocol']}, {evaluation['num_samples']} samples vs the "
                     f"{ref['split']} split, {ref['count']} images)")
    else:
        lines.append("Not evaluated.")
    lines.append(f"Promotion gate: {metric}, {direction} is better")
    if grid:
        link = f"get-artifact?path={grid}&run_uuid={run_id}"
        lines.append(f"Sample grid: [{grid}]({link}) (`runs:/{run_id}/{grid}`)\n\n![sample grid]({link})")
    return "\n\n".join(lines)


def _example_images(params: Params, resolution: int, family=None) -> np.ndarray:
    """Two real images of the run's data (the input example of an image-taking model; a two-domain translator's
    from the source domain of its default direction)."""
    from ganforge.tasks.data import iter_split
    from ganforge.tasks.shard import domain_split

    split = domain_split("val", next(iter(family.directions.values()))[0]) if family and family.directions else "val"
    try:
        imgs, _ = next(iter_split(params.data.shards, split, 2))
    except (FileNotFoundError, StopIteration, ValueError, KeyError):
        return np.zeros((2, resolution, resolution, 3), np.uint8)
    return np.ascontiguousarray(imgs[:, :: imgs.shape[1] // resolution, :: imgs.shape[2] // resolution])


def same_checkpoint(a: str, b: str) -> bool:
    """The same checkpoint: the same folder, or a copy with the same state.pt (e.g. RUN_DIR/stages/<stage>
    exported from Ray storage)."""
    from ganforge.tasks.storage import is_remote

    if str(a) == str(b):
        return True
    if is_remote(a) or is_remote(b):
        return False
    pa, pb = Path(a).resolve(), Path(b).resolve()
    if pa == pb:
        return True
    sa, sb = pa / "state.pt", pb / "state.pt"
    return sa.exists() and sb.exists() and sa.stat().st_size == sb.stat().st_size and sha256_file(sa) == sha256_file(sb)


def evaluation_scores(evaluation: dict | None) -> dict[str, float]:
    """The numbers of an evaluation: its ``scores``; an evaluation.json written before ``scores`` existed gives
    its top-level numbers whose direction is declared (fid, kid, is, rfid, codebook_usage, ...)."""
    from ganforge.tasks.evaluate import direction

    if not evaluation:
        return {}
    if "scores" in evaluation:
        return dict(evaluation["scores"])
    return {k: float(v) for k, v in evaluation.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and direction(k) is not None}


def _existing_versions(client, name: str) -> list:
    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except Exception:  # noqa: BLE001 - no such model yet
        return []


def promote(name: str, version: int | None, params: Params, *, force: bool = False) -> dict:
    """Apply the champion gate to ``version`` (default: the challenger)."""
    from mlflow import MlflowClient

    setup_mlflow(params.runtime)
    client = MlflowClient()
    reg = params.registry
    if version is None:
        version = int(_model_version(client, name, alias=reg.challenger_alias).version)
    with gate_lock(client, name):  # read, decide and move the alias as one step
        return _decide(client, name, int(version), reg, force)


def gate_for(reg, family: str | None) -> tuple[str, str]:
    """The gate's (metric, direction): registry.gate_metric / gate_direction where set, else the family's own
    (``GANFamily.gate``: FID, lower, for generators; accuracy, higher, for classifiers)."""
    from ganforge.models.families import family_classes
    from ganforge.tasks.evaluate import direction

    cls = family_classes().get(family or "")
    metric = reg.gate_metric or (cls.gate[0] if cls else "fid")
    if reg.gate_direction:
        return metric, reg.gate_direction
    if not reg.gate_metric and cls:
        return metric, cls.gate[1]
    return metric, direction(metric) or "lower"


def _decide(client, name: str, version: int, reg, force: bool) -> dict:
    tags = _model_version(client, name, version).tags
    try:
        champ = client.get_model_version_by_alias(name, reg.champion_alias)
    except Exception:  # noqa: BLE001 - no champion yet
        champ = None
    metric, direction = gate_for(reg, tags.get("family"))
    higher = direction == "higher"
    label = metric.upper() if metric in ("fid", "kid", "is") else metric

    def value(t: dict) -> float | None:
        return float(t[metric]) if metric in t else None

    decision: dict[str, Any] = {"name": name, "version": int(version), "forced": force, "metric": metric,
                                "direction": direction, "candidate": value(tags),
                                "champion_version": int(champ.version) if champ else None,
                                "champion": value(champ.tags) if champ else None}

    def record(ok: bool, reason: str) -> dict:
        decision.update(promoted=ok, reason=reason)
        for k, v in {"promotion.decision": "promoted" if ok else "refused", "promotion.reason": reason,
                     "promotion.forced": str(force), "promotion.metric": f"{metric} ({direction} is better)",
                     "promotion.champion_before": str(decision["champion"])}.items():
            _retry(client.set_model_version_tag, name, str(version), k, v)
        if ok:
            _retry(client.set_registered_model_alias, name, reg.champion_alias, str(version))
        log.info("promotion of %s v%s: %s (%s)", name, version, "promoted" if ok else "refused", reason)
        return decision

    if force:
        return record(True, "forced by the user")
    if decision["candidate"] is None:
        record(False, f"version has no {label}: evaluate it before promotion")
        raise PromotionRefused(f"{name} version {version} has no {label} metric: evaluate it before promotion")
    if champ is None:
        return record(True, "first eligible version becomes champion")
    if int(champ.version) == int(version):
        return record(True, "already champion")
    if decision["champion"] is None:
        # a champion without the gate's metric (e.g. one promoted with --force) is no baseline: it must not block
        # every comparable challenger until someone forces again
        return record(True, f"the champion (version {champ.version}) has no {label}: the first version with one "
                            f"takes over")
    mismatch = [k for k in COMPARABLE_TAGS if champ.tags.get(k) != tags.get(k)]
    if mismatch:
        reason = "not comparable with the champion: " + ", ".join(
            f"{k} {tags.get(k)!r} vs {champ.tags.get(k)!r}" for k in mismatch)
        return record(False, reason)
    gain = decision["candidate"] - decision["champion"] if higher else decision["champion"] - decision["candidate"]
    if gain >= reg.min_improvement and gain > 0:
        return record(True, f"{label} {decision['candidate']:.4f} beats champion {decision['champion']:.4f} "
                            f"by {gain:.4f} (>= {reg.min_improvement})")
    return record(False, f"{label} {decision['candidate']:.4f} does not beat champion {decision['champion']:.4f} "
                         f"by at least {reg.min_improvement}")


def list_models(params: Params, name: str | None = None) -> list[dict]:
    from mlflow import MlflowClient

    setup_mlflow(params.runtime)
    client = MlflowClient()
    names = [name] if name else [m.name for m in client.search_registered_models()
                                 if not m.name.endswith(GATE_LOCK_SUFFIX)]
    rows = []
    for n in names:
        aliases = client.get_registered_model(n).aliases  # alias -> version
        for mv in client.search_model_versions(f"name='{n}'"):
            rows.append({"name": n, "version": int(mv.version),
                         "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                         "fid": mv.tags.get("fid"), "kid": mv.tags.get("kid"), "protocol": mv.tags.get("protocol"),
                         "num_samples": mv.tags.get("num_samples"), "decision": mv.tags.get("promotion.decision"),
                         "run_id": mv.run_id})
    return sorted(rows, key=lambda r: (r["name"], r["version"]))
