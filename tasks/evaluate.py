"""`ganforge evaluate`: the registered sample metrics (FID, KID, IS, ...) of a checkpoint against a shard split,
plus reconstruction FID for families that reconstruct and the family's own scores.

The result carries ``scores`` (every number, by name, with the direction in which it improves): MLflow, the
registry's tags, the Prefect table and the promotion gate read that mapping instead of lists of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganforge.tasks.checkpoint import STATE, load_generator
from ganforge.tasks.images import ImageSet, _read_slice, extract_features, reference_features
from ganforge.tasks.io import write_json
from ganforge.tasks.metrics import FEATURE_DIM, METRICS, PROTOCOLS, MetricInputs, feature_stats, frechet_distance
from ganforge.tasks.params import EvalParams, RuntimeParams
from ganforge.tasks.shard import domain_split, is_two_domain, manifest_hash, verify_shards

log = logging.getLogger("ganforge.evaluate")

def direction(name: str) -> str | None:
    """Which way a score improves ("lower"/"higher"): a registered metric's, rfid's, or one a family declares
    for its own scores (a translator's per-direction score, ``fid_AtoB``, as its metric's); None when nobody
    declared it."""
    from ganforge.models.families import family_classes

    base, _, suffix = name.rpartition("_")
    if base in METRICS and any(suffix in cls.directions for cls in family_classes().values()):
        name = base
    if name in METRICS:
        return METRICS[name].direction
    if name == "rfid":
        return "lower"
    for cls in family_classes().values():
        if name in cls.score_directions:
            return cls.score_directions[name]
    return None


def evaluate(checkpoint: str, shards: str | Path, ev: EvalParams, *, out: str | Path | None = None,
             progress: bool = True, runtime: RuntimeParams | None = None) -> dict[str, Any]:
    if not checkpoint:
        raise ValueError("no checkpoint to evaluate (train first, or pass --checkpoint)")
    if not Path(checkpoint, STATE).exists() and "://" not in str(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found (no {STATE})")
    # inputs first: a damaged checkpoint or shard fails in seconds, not after minutes of reference statistics
    family, stage, ema, _ = load_generator(checkpoint)
    manifest = verify_shards(shards)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "protocol": ev.protocol, "protocol_description": PROTOCOLS[ev.protocol],
        "num_samples": ev.num_samples, "seed": ev.seed,
    }
    if is_two_domain(manifest) or family.domains:
        family.check_data(manifest, shards)
        return evaluate_translations(family, stage, ema, str(checkpoint), shards, ev, result, out=out,
                                     progress=progress, runtime=runtime)
    ref = reference_features(shards, ev.split, ev.protocol, ev.cache_dir, workers=ev.workers,
                             batch_size=ev.batch_size, progress=progress, runtime=runtime)
    result["reference"] = {"shards": str(shards), "split": ev.split, "count": int(ref["count"]),
                           "manifest_sha256": manifest_hash(shards), "cache": ref["cache"]}
    result["family"], result["stage"] = family.name, stage.name
    scores: dict[str, float | None] = {}
    gen = ImageSet("generator", str(checkpoint), count=ev.num_samples, seed=ev.seed)
    if ev.num_samples < FEATURE_DIM:
        log.warning("%d samples < %d Inception features: the covariance is rank-deficient and FID biased upward; "
                    "compare FIDs only at the same sample count (the published protocol uses 50,000)",
                    ev.num_samples, FEATURE_DIM)
    # what samples.png shows: samples, or (below) reconstructions / translations, or the reference images
    shown = ImageSet("shards", str(shards), split=ev.split, count=int(ref["count"]))
    if family.can_reconstruct(stage):
        # autoencoder quality: reconstructions of the reference split vs that split
        rec = ImageSet("reconstructions", str(checkpoint), split=ev.split, count=int(ref["count"]), source=str(shards))
        rfeat = extract_features(rec, ev.protocol, workers=ev.workers, batch_size=ev.batch_size, progress=progress,
                                 runtime=runtime)
        scores["rfid"] = frechet_distance(ref["mu"], ref["sigma"], *feature_stats(rfeat))
        shown = rec
    scores.update(family.extra_scores(ema, stage, lambda: _model_inputs(shards, ev, stage.resolution)))
    if family.product == "translator":
        shown = ImageSet("translations", str(checkpoint), split=ev.split, count=int(ref["count"]), source=str(shards))
    if not family.can_sample(stage):
        result["sampling_unavailable"] = f"stage {stage.name} has no sampler: FID/KID/IS of samples are not computed"
        log.warning("%s", result["sampling_unavailable"])
    else:
        fake = extract_features(gen, ev.protocol, workers=ev.workers, batch_size=ev.batch_size, progress=progress,
                                runtime=runtime)
        fake_labels = None
        if family.num_classes:  # each sample's class, as sample() draws it: label_for(its seed)
            fake_labels = np.array([family.label_for(gen.seed * 1_000_003 + j) for j in range(gen.count)])
        inputs = MetricInputs(ref, fake, lambda b: _read_slice(gen, 0, gen.count, b), ev,
                              real_labels=ref["labels"] if fake_labels is not None else None, fake_labels=fake_labels)
        names = list(ev.metrics) + (["intra_fid"] if family.num_classes and "intra_fid" not in ev.metrics else [])
        for name in names:
            out_m = METRICS[name].compute(inputs)
            result.update(out_m)
            scores[name] = out_m.get(name)
        shown = gen
    metrics = list(ev.metrics) + (["intra_fid"] if "intra_fid" in scores and "intra_fid" not in ev.metrics else [])
    return _finish(result, scores, metrics, shown, out)


def _finish(result: dict[str, Any], scores: dict[str, float | None], metrics: list[str], shown: ImageSet,
            out) -> dict[str, Any]:
    """Every score into ``result`` (and its finite ones, with their directions, under ``scores``), and the
    outputs written when ``out`` is given."""
    result.update({k: v for k, v in scores.items() if k not in result})
    result["metrics"] = metrics
    result["scores"] = {k: v for k, v in scores.items() if v is not None and np.isfinite(v)}
    result["directions"] = {k: direction(k) for k in result["scores"]}
    if out is not None:
        write_outputs(result, shown, Path(out))
    return result


def evaluate_translations(family, stage, ema, checkpoint: str, shards, ev: EvalParams, result: dict[str, Any], *,
                          out=None, progress: bool = True, runtime: RuntimeParams | None = None) -> dict[str, Any]:
    """A two-domain translator (CycleGAN) on the test splits: per direction, the sample metrics of the translated
    source split (G(testA)) against the real target split (testB), each reference cached per domain and split;
    the plain name (``fid``) is the mean over the directions, which the promotion gate compares by default; and
    the family's own scores (the cycle-reconstruction L1)."""
    from ganforge.tasks.data import split_count

    scores: dict[str, float | None] = {}
    per: dict[str, dict] = {}
    shown = None
    for d, (src, dst) in family.directions.items():
        src_split, dst_split = domain_split(ev.split, src), domain_split(ev.split, dst)
        n = split_count(shards, src_split)
        if n == 0 or split_count(shards, dst_split) == 0:
            raise ValueError(f"{shards}: split {src_split if n == 0 else dst_split} is empty, nothing to evaluate "
                             f"{d} on: shard with data.val_fraction > 0, or test folders (testA/ testB/)")
        ref = reference_features(shards, dst_split, ev.protocol, ev.cache_dir, workers=ev.workers,
                                 batch_size=ev.batch_size, progress=progress, runtime=runtime)
        trans = ImageSet("translations", checkpoint, split=src_split, count=n, source=str(shards), direction=d)
        shown = shown or trans
        feats = extract_features(trans, ev.protocol, workers=ev.workers, batch_size=ev.batch_size, progress=progress,
                                 runtime=runtime)
        inputs = MetricInputs(ref, feats, lambda b, t=trans: _read_slice(t, 0, t.count, b), ev)
        for name in ev.metrics:
            out_m = METRICS[name].compute(inputs)
            result.update({f"{k}_{d}": v for k, v in out_m.items()})
            scores[f"{name}_{d}"] = out_m.get(name)
        per[d] = {"translated": src_split, "count": n, "reference_split": dst_split, "reference_count": int(ref["count"]),
                  "cache": ref["cache"]}
    if min(p["count"] for p in per.values()) < FEATURE_DIM:
        log.warning("%d translated images < %d Inception features: the covariance is rank-deficient and FID biased "
                    "upward; compare FIDs only on the same test splits", min(p["count"] for p in per.values()),
                    FEATURE_DIM)
    for name in ev.metrics:  # the mean over the directions: what the gate compares by default
        vals = [scores.get(f"{name}_{d}") for d in family.directions]
        scores[name] = float(np.mean(vals)) if all(v is not None for v in vals) else None
    scores.update(family.extra_scores(ema, stage, lambda domain=None: _model_inputs(
        shards, ev, stage.resolution, domain_split(ev.split, domain) if domain else None)))
    result.update(family=family.name, stage=stage.name, num_samples=sum(p["count"] for p in per.values()),
                  translations=per)
    result["reference"] = {"shards": str(shards), "split": "+".join(p["reference_split"] for p in per.values()),
                           "count": sum(p["reference_count"] for p in per.values()),
                           "manifest_sha256": manifest_hash(shards),
                           "cache": "hit" if all(p["cache"] == "hit" for p in per.values()) else "miss"}
    return _finish(result, scores, list(ev.metrics), shown, out)


def _model_inputs(shards, ev: EvalParams, resolution: int, split: str | None = None):
    from ganforge.tasks.data import iter_split, to_model_input

    for imgs, labels in iter_split(shards, split or ev.split, ev.batch_size):
        yield {"image": to_model_input(imgs, resolution), "label": torch.as_tensor(labels, dtype=torch.long)}


def write_outputs(result: dict, shown: ImageSet, out: Path) -> None:
    from ganforge.tasks.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    requested = {m: result.get(m) for m in result["metrics"]}  # null: unavailable (the reason is in evaluation.json)
    metrics = {**requested, **result["scores"], "num_samples": result["num_samples"], "reference_count": result["reference"]["count"],
               "protocol": result["protocol"], "split": result["reference"]["split"]}
    for k, v in result.items():  # kid_std, is_std (a translator's per direction: kid_std_AtoB, ...)
        if k.startswith(("kid_std", "is_std")) and v is not None:
            metrics[k] = v
    write_json(out / "metrics.json", metrics)
    write_json(out / "evaluation.json", result)
    n = min(64, shown.count)
    imgs = next(_read_slice(shown, 0, n, n))
    save_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, out / "samples.png", nrow=8)
