"""Preparation stages (``StageSpec(kind="prepare")``): every shard encoded by the previous stage's modules
into new shards that a later training stage reads (VQ-GAN's code-index tokens; IC-GAN's features next).

This module does the shared work and knows no family: it loads the checkpoint, reads every source shard (train
and val) in batches, runs the shards in parallel as Ray tasks, writes one output shard of the same name per
source shard (the image's key and label kept, the family's fields added), and records a manifest with counts,
content hashes of the source shards and the checkpoint, and what the family adds
(``GANFamily.prepare_encode`` for one batch, ``GANFamily.prepare_manifest`` for the whole). The result is
deterministic for a given checkpoint (single-threaded math per shard, fixed tar metadata), written to a
temporary folder and moved into place whole; a re-run with the same inputs returns the existing manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ganforge.tasks.checkpoint import STATE, build_generator, checkpoint_dir, load_generator, load_state
from ganforge.tasks.io import sha256_file, staged_dir
from ganforge.tasks.params import RuntimeParams, TrainParams
from ganforge.tasks.runtime import init_ray
from ganforge.tasks.shard import MANIFEST, MANIFEST_FORMAT, manifest_hash, read_manifest, verify_shards, write_manifest

log = logging.getLogger("ganforge.prepare")


def _prepare_shard(checkpoint: str, stage_index: int, src: str, dst: str, resolution: int, batch_size: int) -> dict:
    """Encode one source shard into one output shard; returns its record and summed counts."""
    from ganforge.tasks.data import _iter_tar, decode_sample, to_model_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums whatever the machine: deterministic output
    try:
        family, _, ema, _ = load_generator(checkpoint)
        stage = family.stages()[stage_index]
        counts: dict[str, np.ndarray] = {}
        n = 0
        writer = wds.TarWriter(dst, user="ganforge", group="ganforge", mode=0o444, mtime=0, encoder=False)
        try:
            batch: list[tuple[str, np.ndarray, int]] = []

            def flush() -> None:
                nonlocal n
                x = to_model_input(np.stack([a for _, a, _ in batch]), resolution)
                with torch.no_grad():
                    fields, c = family.prepare_encode(ema, stage, x)
                for k, v in c.items():
                    counts[k] = counts[k] + v if k in counts else np.asarray(v).copy()
                for (key, _, label), f in zip(batch, fields):
                    sample = {"__key__": key, **f}
                    if label >= 0:
                        sample["cls"] = str(label).encode()
                    writer.write(sample)
                n += len(batch)
                batch.clear()

            for raw in _iter_tar(src):
                arr, label = decode_sample(raw)
                batch.append((raw["__key__"], arr, label))
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        finally:
            writer.close()
    finally:
        torch.set_num_threads(threads)
    return {"file": Path(dst).name, "count": n, "sha256": sha256_file(Path(dst)), "counts": counts}


def prepare(checkpoint: str | Path, stage_index: int, shards: str | Path, out: str | Path, *, workers: int = 2,
            batch_size: int = 64, progress: bool = True, runtime: RuntimeParams | None = None) -> dict:
    """Run preparation stage ``stage_index`` of ``checkpoint``'s family: every split of ``shards`` encoded with
    the checkpoint's EMA modules into ``out``; returns the output manifest."""
    from tqdm import tqdm

    out, shards = Path(out), Path(shards)
    src_manifest = verify_shards(shards)
    with checkpoint_dir(str(checkpoint)) as d:
        state = load_state(d)
        ckpt_sha = sha256_file(Path(d) / STATE)
    from ganforge.models.families import get_family

    family = get_family(TrainParams.model_validate(state["params"]))
    stage = family.stages()[stage_index]
    if stage.kind != "prepare":
        raise ValueError(f"stage {stage.name} of family {family.name} is not a preparation stage")
    expected = family.stages()[stage_index - 1].name if stage_index > 0 else None
    if state["stage"] != expected:
        raise ValueError(f"checkpoint {checkpoint} is of stage {state['stage']}; stage {stage.name} encodes with "
                         f"the modules of stage {expected}")
    if src_manifest.get("kind") not in (None, "images"):
        raise ValueError(f"{shards} holds {src_manifest['kind']}, not images: stage {stage.name} encodes image shards")
    res = int(state["resolution"])
    src_sha = manifest_hash(shards)
    if (out / MANIFEST).exists():
        try:
            old = read_manifest(out)
            if old.get("checkpoint_sha256") == ckpt_sha and old.get("source", {}).get("manifest_sha256") == src_sha:
                log.info("%s in %s are up to date (checkpoint %s…)", stage.name, out, ckpt_sha[:12])
                return old
        except (ValueError, json.JSONDecodeError):
            pass
    jobs = [(split, s["file"]) for split, entry in src_manifest["splits"].items() for s in entry["shards"]]
    with staged_dir(out) as tmp:
        args = [(str(checkpoint), stage_index, str(shards / f), str(tmp / f), res, batch_size) for _, f in jobs]
        workers = max(1, min(workers, len(jobs)))
        log.info("stage %s: encoding %d shards of %s with %d worker(s)", stage.name, len(jobs), shards, workers)
        bar = tqdm(total=len(jobs), desc=stage.name, unit="shard", disable=not progress)
        if workers == 1:
            results = []
            for a in args:
                results.append(_prepare_shard(*a))
                bar.update(1)
        else:
            import ray

            if not ray.is_initialized():
                init_ray(runtime or RuntimeParams())
            remote = ray.remote(num_cpus=1)(_prepare_shard)
            refs = [remote.remote(*a) for a in args]
            pending = list(refs)
            while pending:
                _, pending = ray.wait(pending, num_returns=1)
                bar.update(1)
            results = ray.get(refs)
        bar.close()
        splits: dict = {}
        counts: dict[str, dict[str, np.ndarray]] = {}
        for (split, _), r in zip(jobs, results):
            e = splits.setdefault(split, {"count": 0, "shards": []})
            e["count"] += r["count"]
            e["shards"].append({k: r[k] for k in ("file", "count", "sha256")})
            c = counts.setdefault(split, {})
            for k, v in r["counts"].items():
                c[k] = c[k] + v if k in c else v
        _, _, ema = build_generator(state["params"], state["stage"], state["ema"], state.get("family_state"))
        fields, per_split = family.prepare_manifest(stage, ema, counts)
        for split, e in splits.items():
            e.update(per_split.get(split, {}))
        manifest = {
            "format": MANIFEST_FORMAT, **fields, "count": sum(e["count"] for e in splits.values()),
            "resolution": res, "classes": src_manifest.get("classes"), "splits": splits,
            "source": {"shards": str(shards), "manifest_sha256": src_sha},
            "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_sha, "checkpoint_stage": state["stage"],
            "stage": stage.name,
        }
        write_manifest(tmp, manifest)
    log.info("stage %s: wrote %d samples (%s) to %s", stage.name, manifest["count"], manifest.get("kind"), out)
    return manifest
