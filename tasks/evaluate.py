"""`ganforge evaluate`: FID / KID / IS of a checkpoint's EMA generator against a shard split."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganforge.tasks.metrics import (
    PROTOCOLS, ImageSet, _read_slice, extract_features, feature_stats, frechet_distance, inception_score_from_logits,
    kernel_inception_distance, load_logits_model, reference_features, tf1_resize,
)
from ganforge.tasks.params import EvalParams
from ganforge.tasks.shard import manifest_hash
from ganforge.tasks.train import load_generator

log = logging.getLogger("ganforge.evaluate")


def _logits(s: ImageSet, model, batch: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for imgs in _read_slice(s, 0, s.count, batch):
            x = tf1_resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float()) / 128.0 - 1.0
            out.append(model(x).float().numpy())
    return np.concatenate(out)


def evaluate(checkpoint: str, shards: str | Path, ev: EvalParams, *, out: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    if not checkpoint:
        raise ValueError("no checkpoint to evaluate (train first, or pass --checkpoint)")
    if not Path(checkpoint, "state.pt").exists() and "://" not in str(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found (no state.pt)")
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "protocol": ev.protocol, "protocol_description": PROTOCOLS[ev.protocol],
        "num_samples": ev.num_samples, "seed": ev.seed,
    }
    ref = reference_features(shards, ev.split, ev.protocol, ev.cache_dir, workers=ev.workers,
                             batch_size=ev.batch_size, progress=progress)
    result["reference"] = {"shards": str(shards), "split": ev.split, "count": int(ref["count"]),
                           "manifest_sha256": manifest_hash(shards), "cache": ref["cache"]}
    family, stage, ema, _ = load_generator(checkpoint)
    result["family"], result["stage"] = family.name, stage.name
    shown = gen = ImageSet("generator", str(checkpoint), count=ev.num_samples, seed=ev.seed)
    if hasattr(family, "reconstruct") and "VQ" in ema:
        # autoencoder quality: reconstructions of the reference split vs that split, and codebook use on it
        rec = ImageSet("reconstructions", str(checkpoint), split=ev.split, count=int(ref["count"]), source=str(shards))
        rfeat = extract_features(rec, ev.protocol, workers=ev.workers, batch_size=ev.batch_size, progress=progress)
        result["rfid"] = frechet_distance(ref["mu"], ref["sigma"], *feature_stats(rfeat))
        result.update(_codebook_use(family, stage, ema, shards, ev))
        shown = rec
    if not family.can_sample(stage):
        result["sampling_unavailable"] = f"stage {stage.name} has no sampler: FID/KID/IS of samples are not computed"
        log.warning("%s", result["sampling_unavailable"])
    else:
        _sample_metrics(result, gen, ref, ev, progress)
        shown = gen
    if out is not None:
        write_outputs(result, shown, Path(out))
    return result


def _codebook_use(family, stage, ema, shards, ev: EvalParams) -> dict:
    from ganforge.models.vqgan import codebook_stats
    from ganforge.tasks.data import iter_split, to_model_input

    codes = []
    with torch.inference_mode():
        for imgs, _ in iter_split(shards, ev.split, ev.batch_size):
            codes.append(ema["VQ"].encode_codes(to_model_input(imgs, stage.resolution)))
    st = codebook_stats(torch.cat(codes), ema["VQ"].quantize.n_embed)
    return {"codebook_usage": st["codebook_usage"], "codebook_perplexity": st["perplexity"],
            "codebook_size": ema["VQ"].quantize.n_embed}


def _sample_metrics(result: dict, gen: ImageSet, ref: dict, ev: EvalParams, progress: bool) -> None:
    fake = extract_features(gen, ev.protocol, workers=ev.workers, batch_size=ev.batch_size, progress=progress)
    if "fid" in ev.metrics:
        result["fid"] = frechet_distance(ref["mu"], ref["sigma"], *feature_stats(fake))
    if "kid" in ev.metrics:
        kid, kid_std, n = kernel_inception_distance(ref["features"], fake, ev.kid_subsets, ev.kid_subset_size, ev.seed)
        result.update(kid=kid, kid_std=kid_std, kid_subset_size=n, kid_subsets=ev.kid_subsets)
    if "is" in ev.metrics:
        model, reason = load_logits_model(ev.inception_logits_path)
        if model is None:
            result.update({"is": None, "is_unavailable": reason})
            log.warning("Inception Score unavailable: %s", reason)
        else:
            result["is"], result["is_std"] = inception_score_from_logits(_logits(gen, model, ev.batch_size), ev.is_splits)


def write_outputs(result: dict, gen: ImageSet, out: Path) -> None:
    from ganforge.tasks.loop import save_grid

    out.mkdir(parents=True, exist_ok=True)
    numbers = {k: result[k] for k in ("fid", "kid", "kid_std", "is", "is_std", "rfid", "codebook_usage",
                                      "codebook_perplexity") if k in result}
    metrics = {**numbers, "num_samples": result["num_samples"], "reference_count": result["reference"]["count"],
               "protocol": result["protocol"], "split": result["reference"]["split"]}
    for name, obj in (("metrics.json", metrics), ("evaluation.json", result)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, out / name)
    n = min(64, gen.count)
    imgs = next(_read_slice(gen, 0, n, n))
    save_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, out / "samples.png", nrow=8)
