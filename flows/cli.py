"""The ``ganforge`` command line: one subcommand per unit of work.

Every subcommand reads ``--params FILE`` (default ``params.yaml``), applies
``--set key.path=value`` overrides and then its explicit flags (which are
shorthands for params keys), validates the result once, and calls the task.
No tensor math lives here.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ganforge.tasks.params import Params, ParamsError, load_params

log = logging.getLogger("ganforge")


class _Flag:
    """An explicit flag that is a shorthand for a params key."""

    def __init__(self, flag: str, key: str, type: Callable = str, help: str = "", action: str | None = None):
        self.flag, self.key, self.type, self.help, self.action = flag, key, type, help, action

    def add(self, p: argparse.ArgumentParser) -> None:
        dest = self.key.replace(".", "__")
        if self.action:
            p.add_argument(self.flag, dest=dest, action=self.action, default=None, help=f"{self.help} [{self.key}]")
        else:
            p.add_argument(self.flag, dest=dest, type=self.type, default=None, help=f"{self.help} [{self.key}]")


def _common(p: argparse.ArgumentParser, flags: list[_Flag]) -> None:
    p.add_argument("--params", default=None, help="params file (default: ./params.yaml, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a params key, e.g. --set train.progan.lr=0.002 (repeatable)")
    for f in flags:
        f.add(p)
    p.set_defaults(_flags=flags)


def resolve_params(args: argparse.Namespace) -> Params:
    overrides: dict[str, Any] = {}
    from ganforge.tasks.params import parse_override

    for o in args.overrides:
        k, v = parse_override(o)
        overrides[k] = v
    for f in args._flags:
        v = getattr(args, f.key.replace(".", "__"))
        if v is not None:
            overrides[f.key] = v
    _kimg_per_stage(args, overrides)
    return load_params(args.params, overrides)


# ----------------------------------------------------------------------------- commands


def cmd_shard(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.shard import shard

    m = shard(params.data.source, params.data.shards, params.data, progress=not args.quiet)
    summary = {
        "out": params.data.shards,
        "count": m["count"],
        "splits": {s: v["count"] for s, v in m["splits"].items()},
        "skipped": len(m["skipped"]),
        "classes": len(m["classes"]),
        "resolution": m["resolution"],
    }
    if m.get("domains"):
        summary["domains"] = {d: v["splits"] for d, v in m["domains"].items()}
    for s in m["skipped"][:20]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if len(m["skipped"]) > 20:
        log.warning("... and %d more skipped (see manifest.json)", len(m["skipped"]) - 20)
    return summary


def cmd_train(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.runtime import check_services
    from ganforge.tasks.train import train, train_stage

    check_services(params.runtime, mlflow=False)  # a Ray cluster, an S3 endpoint: before any work

    if args.stages_file:
        from ganforge.flows.dvc import check_fresh

        check_fresh(params, args.stage, args.stages_file)
    if args.stage_resolution is not None or args.stage is not None:
        from ganforge.models.families import get_family

        stages = get_family(params.train).stages()
        if args.stage is not None:
            match = [s for s in stages if s.name == args.stage]
            if not match:
                raise ValueError(f"--stage {args.stage} is not a stage of family {params.train.family} "
                                 f"(stages: {', '.join(s.name for s in stages)})")
        else:
            match = [s for s in stages if s.resolution == args.stage_resolution]
            if len(match) != 1:
                raise ValueError(f"--stage-resolution {args.stage_resolution} is not one stage of these params "
                                 f"(stages: {', '.join(str(s.resolution) for s in stages)}); keep dvc.yaml in sync")
        rec = train_stage(params.data.shards, params.train.out, params, match[0].index, init=args.init or None,
                          verify=args.verify or None, curve=_curve(params))
        return {"stage": match[0].name, "checkpoint": rec["checkpoint"], "images_seen": rec["images_seen"]}
    summary = train(params.data.shards, params.train.out, params, verify=args.verify or None, curve=_curve(params))
    return {
        "out": params.train.out,
        "final_checkpoint": summary["final_checkpoint"],
        "stages": {k: {"images_seen": v["images_seen"], "wall_time_s": v["wall_time_s"]} for k, v in summary["stages"].items()},
    }


def _curve(params: Params):
    """The FID curve beside training (eval.every_kimg), or None."""
    if not params.eval.every_kimg:
        return None
    from ganforge.tasks.curve import Curve

    return Curve(params, params.train.out)


def cmd_evaluate(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.evaluate import evaluate

    ckpt = args.checkpoint or _final_checkpoint(params)
    return evaluate(ckpt, params.data.shards, params.eval, out=args.out, progress=not args.quiet,
                    runtime=params.runtime)


def _final_checkpoint(params: Params) -> str:
    """The run's last checkpoint, or its best on the curve with registry.checkpoint: best."""
    from pathlib import Path

    from ganforge.tasks.curve import chosen_checkpoint

    p = Path(params.train.out) / "summary.json"
    if not p.exists():
        raise FileNotFoundError(f"no --checkpoint given and no {p}: train first or name a checkpoint")
    ckpt = json.loads(p.read_text()).get("final_checkpoint")
    if not ckpt:
        raise ValueError(f"{p} has no final_checkpoint: the run has not finished")
    return chosen_checkpoint(params, ckpt)


def cmd_fid(args: argparse.Namespace, params: Params) -> str:
    from ganforge.tasks.images import fid_between

    r = fid_between(args.a, args.b, params.eval.protocol, workers=params.eval.workers,
                    batch_size=params.eval.batch_size, split=params.eval.split, runtime=params.runtime)
    log.info("FID %s vs %s (%s): %.4f", r["a"], r["b"], r["protocol"], r["fid"])
    return f"{r['fid']:.6f}"


def cmd_register(args: argparse.Namespace, params: Params) -> dict:
    """Register a checkpoint (with its evaluation) as a new version, alias challenger, then apply the gate."""
    from pathlib import Path

    from ganforge.tasks.registry import PromotionRefused, promote, register, start_pipeline_run
    from ganforge.tasks.shard import manifest_hash

    ckpt = args.checkpoint or _final_checkpoint(params)
    evaluation = json.loads(Path(args.evaluation).read_text()) if args.evaluation else None
    run_id = args.run_id or start_pipeline_run(params, params.data.shards, run_name="register")
    reg = register(ckpt, evaluation, params, run_id, data_sha256=manifest_hash(params.data.shards))
    try:
        decision = promote(reg["name"], reg["version"], params)
    except PromotionRefused as e:
        decision = {"promoted": False, "reason": str(e)}
    return {"name": reg["name"], "version": reg["version"], "run_id": run_id, "promotion": decision}


def cmd_promote(args: argparse.Namespace, params: Params) -> dict:
    """Exit 0 only when the version is champion afterwards; every refusal exits 3 (with the decision printed)."""
    from ganforge.tasks.registry import PromotionRefused, promote

    name = args.model or params.registry.model_name or f"ganforge-{params.train.family}"
    decision = promote(name, args.version, params, force=args.force)
    if not decision["promoted"]:
        err = PromotionRefused(f"{name} version {decision['version']}: {decision['reason']}")
        err.decision = decision
        raise err
    return decision


def cmd_models(args: argparse.Namespace, params: Params) -> str:
    from ganforge.tasks.registry import list_models

    rows = list_models(params, args.model)
    lines = [f"{'name':28} {'ver':>4} {'aliases':22} {'fid':>10} {'kid':>10} {'protocol':8} {'n':>6} decision"]
    for r in rows:
        fid = f"{float(r['fid']):.3f}" if r["fid"] else "-"
        kid = f"{float(r['kid']):.4f}" if r["kid"] else "-"
        lines.append(f"{r['name']:28} {r['version']:>4} {','.join(r['aliases']) or '-':22} {fid:>10} {kid:>10} "
                     f"{r['protocol'] or '-':8} {r['num_samples'] or '-':>6} {r['decision'] or '-'}")
    print("\n".join(lines))
    return json.dumps(rows)


def cmd_sample(args: argparse.Namespace, params: Params) -> dict:
    import torch

    from ganforge.tasks.images import save_grid
    from ganforge.tasks.registry import sample_registered, setup_mlflow

    setup_mlflow(params.runtime)
    labels = [args.label] * args.n if args.label is not None else None
    imgs = sample_registered(args.model, list(range(args.seed, args.seed + args.n)), args.truncation, labels)
    if str(args.out).endswith(".npy"):  # the images themselves, byte for byte what the pyfunc returns
        import numpy as np

        np.save(args.out, imgs)
    else:
        nrow = max(1, int(round(args.n ** 0.5)))
        save_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, args.out, nrow=nrow)
    return {"model": args.model, "n": args.n, "out": args.out, "shape": list(imgs.shape)}


def _seeds(flag: str, text: str) -> list[int]:
    """``1,2,3`` or ``0-4`` (inclusive) or a mix: ``0-2,7``."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        a, sep, b = part.partition("-")
        if not (a.isdigit() and (not sep or b.isdigit())):
            raise ParamsError(f"{flag} takes seeds like 1,2,3 or 0-4, got {text!r}")
        if sep and int(b) < int(a):
            raise ParamsError(f"{flag}: the range {part} is empty (write it low-high, e.g. 0-4)")
        out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    return out


def cmd_stylemix(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.figures import stylemix
    from ganforge.tasks.registry import setup_mlflow

    rows, cols = _seeds("--rows", args.rows), _seeds("--cols", args.cols)
    if str(args.model).startswith(("models:/", "runs:/")):
        setup_mlflow(params.runtime)
    return stylemix(args.model, rows, cols, args.layers, args.out,
                    truncation=None if args.truncation == 1.0 else args.truncation)


def _stylemix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION or a checkpoint folder")
    p.add_argument("--rows", default="0-3", help="seeds of the row sources, e.g. 1,2,3 or 0-3")
    p.add_argument("--cols", default="4-8", help="seeds of the column sources (their styles replace the rows')")
    p.add_argument("--layers", default="coarse",
                   help="styles taken from the columns: coarse (4-8px), middle (16-32px), fine (64px+) or A-B")
    p.add_argument("--truncation", type=float, default=1.0, help="psi toward w_avg for every source; 1: off")
    p.add_argument("--out", default="stylemix.png")


def cmd_translate(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.registry import setup_mlflow
    from ganforge.tasks.translate import translate

    if str(args.model).startswith(("models:/", "runs:/")):
        setup_mlflow(params.runtime)
    return translate(args.model, args.input, args.out, args.direction)


def _translate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION or a checkpoint folder")
    p.add_argument("--input", required=True, help="an image file or a folder of images (other sizes are resized)")
    p.add_argument("--direction", default=None, help="AtoB or BtoA (CycleGAN); default: AtoB")
    p.add_argument("--out", default="translated", help="folder for the translated PNGs (same relative names)")


def cmd_pipeline(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.flows.pipeline import train_pipeline
    from ganforge.flows.services import ensure_prefect_api
    from ganforge.tasks.runtime import check_services

    check_services(params.runtime, prefect=True)  # before the first stage, not after the last
    ensure_prefect_api()
    r = train_pipeline(params=params)
    w = max([13, *map(len, r["scores"])])  # a translator's scores are per direction: fid_AtoB, ...
    scores = "\n".join(f"  {k:{w}}: {v:.5g}" for k, v in r["scores"].items())
    print(
        f"\n== ganforge pipeline done ==\n"
        f"  {'samples grid':{w}}: {r['grid']}\n"
        f"  {'evaluated on':{w}}: {r['protocol']}, {r['num_samples']} samples\n{scores}\n"
        f"  {'model':{w}}: {r['model']} version {r['version']} "
        f"({'champion' if r['promoted'] else 'challenger'}: {r['decision']})\n"
        f"  {'checkpoint':{w}}: {r['checkpoint']}\n"
        f"  {'MLflow UI':{w}}: make mlflow-ui   (run {r['mlflow_run_id']})\n"
    )
    return r


def cmd_sweep(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.sweep import check_sweep, parse_space

    space = parse_space(args.space, args.grid, args.choice, args.loguniform, args.uniform)
    check_sweep(params, space, args.num_samples, args.stages)  # refusals before Prefect and Ray start
    from ganforge.flows.services import ensure_prefect_api
    from ganforge.flows.sweep import sweep_flow
    from ganforge.tasks.runtime import check_services

    check_services(params.runtime, prefect=True)
    ensure_prefect_api()
    r = sweep_flow(space=space, out=args.out, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                   stages=args.stages, grace_kimg=args.grace_kimg, reduction_factor=args.reduction_factor,
                   register=args.register, params=params)
    summary = json.loads((Path(r["out"]) / "trials.json").read_text())
    metric, keys = summary["metric"], list(space)
    lines = [f"\n== ganforge sweep: {r['trials']} trials, {r['stopped_early']} stopped early (ASHA), best first =="]
    for t in summary["trials"]:
        best = t[f"best_{metric}"]
        lines.append(f"  {t['trial_id']:<14} {' '.join(f'{k}={t[k]!r}' for k in keys)}  {metric} "
                     f"{'-' if best is None else f'{best:.4g}'} at {t['best_kimg'] or 0:.3g} kimg  [{t['status']}]")
    if r["best_params"]:
        lines.append(f"  best params: {r['best_params']}  (ganforge pipeline --params {r['best_params']})")
    print("\n".join(lines) + "\n")
    return r


def cmd_serve(args: argparse.Namespace, params: Params) -> None:
    from ganforge.flows.deploy import serve

    serve(params, cron=args.cron, interval=args.interval)


def cmd_deploy(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.flows.deploy import deploy_to_pool

    ids = deploy_to_pool(params, args.work_pool, cron=args.cron, interval=args.interval, source=args.source)
    return {"work_pool": args.work_pool, "deployments": ids}


def cmd_dvc_stages(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.flows.dvc import write_stages

    pipelines = None
    if args.pipeline:
        pipelines = {}
        for spec in args.pipeline:
            name, _, rest = spec.partition("=")
            family, _, out = rest.partition(":")
            if not (name and family and out):
                raise ValueError(f"--pipeline expects NAME=FAMILY:RUN_DIR (e.g. demo=progan:runs/demo), got {spec!r}")
            pipelines[name] = (family, out)
    doc = write_stages(params, pipelines, args.file)
    return {"file": args.file, "pipelines": list(doc["pipelines"]),
            "stages": list(doc["train"]) + list(doc["prepare"])}


def cmd_dvc_remote(args: argparse.Namespace, params: Params) -> dict:
    from ganforge.tasks.storage import configure_dvc_remote

    return configure_dvc_remote(params.runtime.dvc_remote, params.runtime.s3_endpoint_url)


def _kimg_per_stage(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    k = getattr(args, "kimg_per_stage", None)
    if k is not None:
        from ganforge.models.families import family_classes

        for name, cls in family_classes().items():  # each family says which of its keys set a stage's length
            for key, v in cls.kimg_overrides(k).items():
                overrides[f"train.{name}.{key}"] = v


_PROTOCOL = _Flag("--protocol", "eval.protocol", help="tf1 (published) or clean")
_EVAL_WORKERS = _Flag("--workers", "eval.workers", int, "Ray workers for feature extraction")

COMMANDS: dict[str, tuple[Callable, list[_Flag], str]] = {
    "shard": (
        cmd_shard,
        [
            _Flag("--source", "data.source", help="image folder, .zip, digits, synthetic:<kind>[:N], photo:<china|flower>"
                  "[:N], torchvision:<NAME>; a folder with trainA/ trainB/ (CycleGAN's layout) holds two domains"),
            _Flag("--source-b", "data.source_b", help="domain B of unpaired two-domain data (CycleGAN); --source is A"),
            _Flag("--out", "data.shards", help="output folder"),
            _Flag("--resolution", "data.resolution", int, "output resolution (power of two)"),
            _Flag("--shard-size", "data.shard_size", int, "samples per shard"),
            _Flag("--val-fraction", "data.val_fraction", float, "held-out fraction"),
            _Flag("--workers", "data.workers", int, "decode processes"),
            _Flag("--seed", "data.seed", int, "shuffle seed"),
            _Flag("--image-format", "data.image_format", str, "npy (decode-free) or png"),
            _Flag("--download", "data.download", action="store_true", help="allow torchvision downloads"),
            _Flag("--max-train-images", "data.max_train_images", int,
                  "keep only the first N train images (small-data experiments; val unchanged)"),
            _Flag("--labelled-per-class", "data.labelled_per_class", int,
                  "also write a labelled split of N train images per class (semi-supervised families)"),
        ],
        "write WebDataset shards + manifest.json from an image source",
    ),
    "train": (
        cmd_train,
        [
            _Flag("--data", "data.shards", help="shard folder (from `ganforge shard`)"),
            _Flag("--out", "train.out", help="run folder; an existing one is resumed"),
            _Flag("--family", "train.family", help="GAN family"),
            _Flag("--resolution", "train.resolution", int, "final resolution"),
            _Flag("--workers", "train.workers", int, "Ray Train workers per stage"),
            _Flag("--gpus-per-worker", "train.gpus_per_worker", float, "GPUs per worker (0: CPU + gloo)"),
            _Flag("--max-failures", "train.max_failures", int, "worker-group restarts per stage"),
            _Flag("--batch-size", "train.batch_size", int, "global batch"),
        ],
        "train every stage of a family (each stage one Ray Train job), resuming what exists",
    ),
    "evaluate": (
        cmd_evaluate,
        [
            _Flag("--data", "data.shards", help="shard folder with the reference split"),
            _Flag("--num-samples", "eval.num_samples", int, "generated images"),
            _Flag("--metrics", "eval.metrics", lambda v: [m.strip() for m in v.split(",") if m.strip()], "e.g. fid,kid,is"),
            _Flag("--split", "eval.split", help="reference split (train or val)"),
            _PROTOCOL,
            _EVAL_WORKERS,
        ],
        "FID/KID/IS of a checkpoint's EMA generator; the last stdout line is JSON",
    ),
    "fid": (
        cmd_fid,
        [
            _PROTOCOL,
            _Flag("--split", "eval.split", help="split used for shard folders without ':split'"),
            _EVAL_WORKERS,
        ],
        "FID between two image sets (image folder, shard folder[:split], or uint8 .npy); last line is the number",
    ),
    "register": (
        cmd_register,
        [_Flag("--data", "data.shards", help="shard folder the model was trained on")],
        "register a checkpoint in the MLflow registry (alias challenger) and apply the champion gate",
    ),
    "promote": (cmd_promote, [], "apply the champion gate to a registered version (or --force it)"),
    "pipeline": (cmd_pipeline, [], "run the whole Prefect flow: shard -> stages -> evaluate -> register -> promote"),
    "sweep": (cmd_sweep, [], "search params with Ray Tune (ASHA on the FID curve beside training), each trial the "
                             "family's stages as Ray Train jobs; the same --out again resumes it"),
    "serve": (cmd_serve, [], "serve Prefect deployments of the three flows (schedules optional) for the UI"),
    "deploy": (cmd_deploy, [], "register the deployments on a work pool, for `prefect worker start --pool NAME`"),
    "models": (cmd_models, [], "list registered versions with metrics and aliases"),
    "sample": (cmd_sample, [], "draw a grid of images from a registered model (models:/NAME@alias)"),
    "stylemix": (cmd_stylemix, [], "the style-mixing figure of a StyleGAN / StyleGAN2 model (registered or a "
                                   "checkpoint): row sources, column sources and their mixes"),
    "translate": (cmd_translate, [], "translate your own images with a translator (CycleGAN; registered or a "
                                     "checkpoint), AtoB or BtoA, at the model's resolution"),
    "dvc-stages": (cmd_dvc_stages, [],
                   "write dvc-stages.yaml (what dvc.yaml iterates) from params and each family's stage list"),
    "dvc-remote": (cmd_dvc_remote, [_Flag("--remote", "runtime.dvc_remote", help="DVC remote URL (s3://bucket/path, a folder)")],
                   "make runtime.dvc_remote (with runtime.s3_endpoint_url) this repository's default DVC remote"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganforge", description="GAN training as reproducible, distributed pipelines")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug lines, other libraries' INFO lines and Ray worker output in the terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (fn, flags, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        _common(sp, flags)
        extra = EXTRA_ARGS.get(name)
        if extra:
            extra(sp)
        sp.set_defaults(_fn=fn)
    return p


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: train.out's last, or its best with registry.checkpoint: best)")
    p.add_argument("--out", default=None, help="write metrics.json (DVC), evaluation.json and samples.png here")


def _fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="image folder, shard folder (DIR or DIR:split) or uint8 .npy")
    p.add_argument("b", help="image folder, shard folder (DIR or DIR:split) or uint8 .npy")


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: train.out's last, or its best with registry.checkpoint: best)")
    p.add_argument("--evaluation", default=None, help="evaluation.json from `ganforge evaluate --out`")
    p.add_argument("--run-id", default=None, help="MLflow run to log the model into (default: a new run)")


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registered name (default: registry.model_name or ganforge-<family>)")
    p.add_argument("--version", type=int, default=None, help="version (default: the challenger)")
    p.add_argument("--force", action="store_true", help="override the gate (recorded as a tag)")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="e.g. models:/ganforge-progan@champion")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="first seed; images use seeds seed..seed+n-1")
    p.add_argument("--truncation", type=float, default=1.0,
                   help="the family's truncation (StyleGAN: psi toward w_avg; VQ-GAN: nucleus mass); 1: off")
    p.add_argument("--label", type=int, default=None, help="class of every image (class-conditional models)")
    p.add_argument("--out", default="grid.png", help="a grid image (.png), or the uint8 images N x H x W x 3 (.npy)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kimg-per-stage", type=float, default=None,
                   help="thousands of images per stage (each family maps it to its own keys, e.g. ProGAN: half "
                        "transition, half stabilisation; VQ-GAN: autoencoder and prior)")
    p.add_argument("--stage-resolution", type=int, default=None,
                   help="run only the stage at this resolution (what each dvc.yaml train stage calls)")
    p.add_argument("--stage", default=None, help="run only the stage of this name (e.g. vqgan-3-prior)")
    p.add_argument("--init", default=None, help="with --stage(-resolution): the previous stage's checkpoint dir")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 before training (by default only when the shards are small)")
    p.add_argument("--stages-file", default=None,
                   help="refuse to run when this dvc-stages.yaml no longer matches params (what dvc.yaml passes)")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default=None, help="YAML search space: {params.key: {grid|choice|loguniform|uniform: [...]}}")
    for kind, example in (("grid", "train.batch_size=16,32"), ("choice", "train.progan.r1_gamma=1,10"),
                          ("loguniform", "train.progan.lr=0.0005,0.005"), ("uniform", "train.progan.beta1=0,0.5")):
        p.add_argument(f"--{kind}", action="append", default=[], metavar="KEY=V1,V2",
                       help=f"a {kind} dimension, e.g. {example} (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the space (a grid is repeated this often)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit Ray)")
    p.add_argument("--stages", type=int, default=None, help="train only the first N stages of the chain per trial")
    p.add_argument("--grace-kimg", type=float, default=None, help="ASHA: kimg before a trial may be stopped "
                                                                  "(default: eval.every_kimg)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: rung spacing and the fraction kept")
    p.add_argument("--out", default="runs/sweep", help="sweep folder (an existing one of the same sweep resumes)")
    p.add_argument("--register", action="store_true",
                   help="evaluate the best trial's best checkpoint and register it (alias challenger)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cron", default=None, help="cron schedule for train-pipeline, e.g. '0 3 * * *'")
    p.add_argument("--interval", type=float, default=None, help="interval schedule for train-pipeline, seconds")


def _deploy_args(p: argparse.ArgumentParser) -> None:
    _serve_args(p)
    p.add_argument("--work-pool", default="ganforge", help="Prefect work pool (create it: prefect work-pool create NAME --type process)")
    p.add_argument("--source", default=None, help="where the worker finds the code (default: this installation)")


def _dvc_stages_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", default="dvc-stages.yaml", help="the vars file dvc.yaml reads")
    p.add_argument("--pipeline", action="append", default=[], metavar="NAME=FAMILY:RUN_DIR",
                   help="a pipeline to list (repeatable); default: those already in the file, else "
                        "train.family in train.out")


EXTRA_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "dvc-stages": _dvc_stages_args,
    "serve": _serve_args,
    "sweep": _sweep_args,
    "deploy": _deploy_args,
    "register": _register_args,
    "promote": _promote_args,
    "models": lambda p: p.add_argument("--model", default=None, help="only this registered name"),
    "sample": _sample_args,
    "stylemix": _stylemix_args,
    "translate": _translate_args,
    "train": _train_args,
    "evaluate": _evaluate_args,
    "fid": _fid_args,
}


def failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for a failure: the codes are listed in ganforge.tasks.errors."""
    from ganforge.tasks.errors import GanforgeError, one_line, root_cause
    from ganforge.tasks.io import visible_path

    if isinstance(exc, GanforgeError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return 6, f"read-only file system: cannot write {visible_path(exc.filename) if exc.filename else exc}"
    if isinstance(exc, PermissionError):
        return 6, f"permission denied: {visible_path(exc.filename) if exc.filename else exc}" + (f" ({exc.strerror})" if exc.strerror else "")
    if isinstance(exc, FileNotFoundError):
        return 4, str(exc) if not exc.filename else f"not found: {exc.filename}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | FileExistsError):
        return 4, f"{exc.strerror}: {exc.filename} (a file stands where a folder is needed, or the reverse)"
    if type(exc).__name__ == "MlflowException":
        return 1, f"MLflow: {str(exc).splitlines()[0][:400]}"
    if isinstance(exc, (ValueError, RuntimeError, KeyError, OSError)):
        return 1, one_line(root_cause(exc)) if not isinstance(exc, (ValueError, RuntimeError)) else str(exc)
    return 1, f"unexpected {one_line(exc)} (run with -v for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ganforge.tasks.console import configure
    from ganforge.tasks.runtime import apply_prefect_api_url
    from ganforge.tasks.secrets import redact

    configure(verbose=args.verbose, progress=not args.quiet)
    try:
        params = resolve_params(args)
        apply_prefect_api_url(params.runtime)
        result = args._fn(args, params)
    except KeyboardInterrupt:
        # Ctrl-C cut short a pending read of Ray's report queue: Ray would print that unretrieved result as a
        # 28-line "Unhandled error" (ray.util.queue.Empty) at shutdown, after our line
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        logging.getLogger("ray").setLevel(logging.CRITICAL)
        print(f"ganforge {args.command}: interrupted; a re-run resumes what was checkpointed", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        log.debug("failure", exc_info=True)
        code, line = failure(e)
        decision = getattr(e, "decision", None)
        if decision is not None:  # a refusal still prints the gate's decision as the last stdout line
            print(json.dumps(decision, default=str))
        kind = "refused" if code == 3 else "error"
        line = redact(line)  # a failure naming a URI names it without its credentials
        print(f"ganforge {args.command}: {kind}: {line}" if code != 2 else f"ganforge {args.command}: {line}",
              file=sys.stderr)
        return code
    if result is not None:
        # The last line of stdout is machine-readable.
        print(json.dumps(result, default=str) if not isinstance(result, str) else result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
