"""The VQ-GAN tokens stage: every image shard encoded into code-index grids, as new shards.

Each source shard (train and val) becomes one token shard of the same name,
holding per sample ``<key>.npy`` (int16 h x w code indices) and ``<key>.cls``
when the image had a label. Shards are encoded in parallel as Ray tasks; the
result is deterministic for a given checkpoint (single-threaded math per shard,
fixed tar metadata), written to a temporary folder and moved into place whole.
The manifest records counts, the grid and codebook size, codebook use per split
and the content hashes of the source shards and the checkpoint; a re-run with
the same inputs returns the existing manifest without encoding again.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ganforge.models.families import get_family
from ganforge.tasks.checkpoint import STATE, checkpoint_dir, load_generator, load_state
from ganforge.tasks.io import sha256_file, staged_dir
from ganforge.tasks.params import RuntimeParams, TrainParams
from ganforge.tasks.runtime import init_ray
from ganforge.tasks.shard import MANIFEST, MANIFEST_FORMAT, manifest_hash, read_manifest, verify_shards, write_manifest

log = logging.getLogger("ganforge.tokens")


def _encode_shard(checkpoint: str, src: str, dst: str, resolution: int, batch_size: int) -> dict:
    """Encode one image shard into one token shard; returns its record and code histogram."""
    from ganforge.tasks.data import _iter_tar, decode_sample, to_model_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums whatever the machine: deterministic codes
    try:
        _, _, ema, _ = load_generator(checkpoint)
        vq = ema["VQ"]
        counts = np.zeros(vq.quantize.n_embed, np.int64)
        n = 0
        writer = wds.TarWriter(dst, user="ganforge", group="ganforge", mode=0o444, mtime=0, encoder=False)
        try:
            batch: list[tuple[str, np.ndarray, int]] = []

            def flush() -> None:
                nonlocal n
                x = to_model_input(np.stack([a for _, a, _ in batch]), resolution)
                codes = vq.encode_codes(x).numpy().astype(np.int16)
                np.add.at(counts, codes.reshape(-1), 1)
                for (key, _, label), c in zip(batch, codes):
                    buf = io.BytesIO()
                    np.save(buf, c, allow_pickle=False)
                    sample = {"__key__": key, "npy": buf.getvalue()}
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
    return {"file": Path(dst).name, "count": n, "sha256": sha256_file(Path(dst)), "histogram": counts}


def _usage(hist: np.ndarray) -> dict:
    p = hist / max(1, hist.sum())
    nz = p[p > 0]
    return {"codebook_usage": float((hist > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "codes_used": int((hist > 0).sum())}


def extract_tokens(checkpoint: str | Path, shards: str | Path, out: str | Path, *, workers: int = 2,
                   batch_size: int = 64, progress: bool = True, runtime: RuntimeParams | None = None) -> dict:
    """Encode every split of ``shards`` with ``checkpoint``'s autoencoder into token shards in ``out``."""
    from tqdm import tqdm

    out, shards = Path(out), Path(shards)
    src_manifest = verify_shards(shards)
    if src_manifest.get("kind") == "tokens":
        raise ValueError(f"{shards} already holds tokens; the tokens stage encodes image shards")
    with checkpoint_dir(str(checkpoint)) as d:
        state = load_state(d)
        ckpt_sha = sha256_file(Path(d) / STATE)
    if "VQ" not in state["ema"]:
        raise ValueError(f"checkpoint {checkpoint} ({state.get('family')}/{state.get('stage')}) has no VQ autoencoder")
    res = int(state["resolution"])
    src_sha = manifest_hash(shards)
    if (out / MANIFEST).exists():
        try:
            old = read_manifest(out)
            if old.get("checkpoint_sha256") == ckpt_sha and old.get("source", {}).get("manifest_sha256") == src_sha:
                log.info("tokens in %s are up to date (checkpoint %s…)", out, ckpt_sha[:12])
                return old
        except (ValueError, json.JSONDecodeError):
            pass
    jobs = [(split, s["file"]) for split, entry in src_manifest["splits"].items() for s in entry["shards"]]
    with staged_dir(out) as tmp:
        args = [(str(checkpoint), str(shards / f), str(tmp / f), res, batch_size) for _, f in jobs]
        workers = max(1, min(workers, len(jobs)))
        log.info("encoding %d shards of %s into tokens with %d worker(s)", len(jobs), shards, workers)
        bar = tqdm(total=len(jobs), desc="tokens", unit="shard", disable=not progress)
        if workers == 1:
            results = []
            for a in args:
                results.append(_encode_shard(*a))
                bar.update(1)
        else:
            import ray

            if not ray.is_initialized():
                init_ray(runtime or RuntimeParams())
            remote = ray.remote(num_cpus=1)(_encode_shard)
            refs = [remote.remote(*a) for a in args]
            pending = list(refs)
            while pending:
                _, pending = ray.wait(pending, num_returns=1)
                bar.update(1)
            results = ray.get(refs)
        bar.close()
        vq = state["ema"]["VQ"]
        n_embed, _ = vq["quantize.embedding.weight"].shape
        splits: dict = {}
        for (split, _), r in zip(jobs, results):
            e = splits.setdefault(split, {"count": 0, "shards": [], "_hist": np.zeros(n_embed, np.int64)})
            e["count"] += r["count"]
            e["shards"].append({k: r[k] for k in ("file", "count", "sha256")})
            e["_hist"] += r["histogram"]
        for e in splits.values():
            e.update(_usage(e.pop("_hist")))
        grid = get_family(TrainParams.model_validate(state["params"])).grid_hw
        manifest = {
            "format": MANIFEST_FORMAT, "kind": "tokens", "count": sum(e["count"] for e in splits.values()),
            "grid": [grid, grid], "codebook_size": int(n_embed), "dtype": "int16", "resolution": res,
            "classes": src_manifest.get("classes"), "splits": splits,
            "source": {"shards": str(shards), "manifest_sha256": src_sha},
            "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_sha, "checkpoint_stage": state["stage"],
        }
        write_manifest(tmp, manifest)
    log.info("wrote %d token grids (%dx%d of %d codes) to %s; train codebook usage %.1f%%", manifest["count"], grid,
             grid, n_embed, out, 100 * splits.get("train", {}).get("codebook_usage", 0.0))
    return manifest
