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
from ganforge.tasks.shard import manifest_hash, verify_shards

log = logging.getLogger("ganforge.evaluate")

def direction(name: str) -> str | None:
    """Which way a score improves ("lower"/"higher"): a registered metric's, rfid's, or one a family declares
    for its own scores; None when nobody declared it."""
    from ganforge.models.families import family_classes

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
    verify_shards(shards)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "protocol": ev.protocol, "protocol_description": PROTOCOLS[ev.protocol],
        "num_samples": ev.num_samples, "seed": ev.seed,
    }
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
    result.update({k: v for k, v in scores.items() if k not in result})
    result["metrics"] = list(ev.metrics) + (["intra_fid"] if "intra_fid" in scores and "intra_fid" not in ev.metrics
                                            else [])
    result["scores"] = {k: v for k, v in scores.items() if v is not None and np.isfinite(v)}
    result["directions"] = {k: direction(k) for k in result["scores"]}
    if out is not None:
        write_outputs(result, shown, Path(out))
    return result


def _model_inputs(shards, ev: EvalParams, resolution: int):
    from ganforge.tasks.data import iter_split, to_model_input

    for imgs, labels in iter_split(shards, ev.split, ev.batch_size):
        yield {"image": to_model_input(imgs, resolution), "label": torch.as_tensor(labels, dtype=torch.long)}


def write_outputs(result: dict, shown: ImageSet, out: Path) -> None:
    from ganforge.tasks.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    requested = {m: result.get(m) for m in result["metrics"]}  # null: unavailable (the reason is in evaluation.json)
    metrics = {**requested, **result["scores"], "num_samples": result["num_samples"], "reference_count": result["reference"]["count"],
               "protocol": result["protocol"], "split": result["reference"]["split"]}
    for k in ("kid_std", "is_std"):
        if result.get(k) is not None:
            metrics[k] = result[k]
    write_json(out / "metrics.json", metrics)
    write_json(out / "evaluation.json", result)
    n = min(64, shown.count)
    imgs = next(_read_slice(shown, 0, n, n))
    save_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, out / "samples.png", nrow=8)
