"""Image sets that metrics read in slices: shard splits, folders, .npy arrays, a checkpoint's samples and its
reconstructions; Ray-parallel feature extraction; the cached reference statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from ganforge.tasks.checkpoint import load_generator
from ganforge.tasks.data import iter_split, split_count, to_model_input
from ganforge.tasks.metrics import FEATURE_DIM, FeatureExtractor, feature_stats, frechet_distance, quantize
from ganforge.tasks.params import RuntimeParams
from ganforge.tasks.runtime import init_ray

log = logging.getLogger("ganforge.metrics")



@dataclass(frozen=True)
class ImageSet:
    """A set of uint8 images that can be read in slices: shards (a split), a folder, a .npy, or a generator."""

    kind: str  # "shards" | "folder" | "npy" | "generator" | "reconstructions" / "translations" (of ``source``'s
    #            split by the checkpoint ``path``)
    path: str
    split: str = "val"
    count: int = 0
    seed: int = 0
    source: str = ""
    direction: str = ""  # translations of a two-domain translator: AtoB, BtoA

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": self.path, "count": self.count}
        if self.kind == "shards":
            d["split"] = self.split
        if self.kind == "generator":
            d["seed"] = self.seed
        if self.kind in ("reconstructions", "translations"):
            d.update(source=self.source, split=self.split)
        if self.direction:
            d["direction"] = self.direction
        return d


def image_set(spec: str, split: str = "val") -> ImageSet:
    """``DIR`` (shards with manifest.json, or an image folder), ``DIR:split``, or ``FILE.npy``."""
    from ganforge.tasks.storage import exists, is_remote, join

    if is_remote(spec):  # shards by URL: s3://bucket/prefix or s3://bucket/prefix:split
        base, _, sp = spec.rpartition(":") if spec.count(":") > 1 else (spec, "", split)
        if not exists(join(base, "manifest.json")):
            raise FileNotFoundError(f"{spec}: no manifest.json there (remote image sets must be shard folders)")
        return ImageSet("shards", base, split=sp, count=split_count(base, sp))
    p = Path(spec)
    if spec.endswith(".npy"):
        if not p.exists():
            raise FileNotFoundError(f"{spec} not found")
        arr = np.load(p, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise ValueError(f"{spec}: expected a uint8 array NxHxW or NxHxWx3, got {arr.dtype} {arr.shape}")
        return ImageSet("npy", str(p), count=len(arr))
    if not p.exists() and ":" in spec:
        base, split = spec.rsplit(":", 1)
        p = Path(base)
    if (p / "manifest.json").exists():
        return ImageSet("shards", str(p), split=split, count=split_count(p, split))
    if p.is_dir():
        from ganforge.tasks.sources import IMAGE_EXTENSIONS

        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{spec}: no images found")
        return ImageSet("folder", str(p), count=len(files))
    raise FileNotFoundError(f"{spec}: not a shard folder, an image folder or a .npy file")


def _read_slice(s: ImageSet, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
    if s.kind == "shards":
        for imgs, _ in iter_split(s.path, s.split, batch, start=start, stop=stop):
            yield imgs
    elif s.kind == "npy":
        arr = np.load(s.path, mmap_mode="r")
        for i in range(start, stop, batch):
            a = np.asarray(arr[i : min(i + batch, stop)])
            if a.ndim == 3:
                a = a[..., None]
            yield np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    elif s.kind == "folder":
        from ganforge.tasks.sources import IMAGE_EXTENSIONS, to_rgb

        files = sorted(str(f) for f in Path(s.path).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)[start:stop]
        for f in files:  # sizes may differ: one image at a time
            yield np.asarray(to_rgb(Image.open(f)))[None]
    elif s.kind == "generator":
        family, stage, ema, _ = load_generator(s.path)
        for i in range(start, stop, batch):
            # one seed (and so one latent and, for conditional families, one class) per global sample index:
            # independent of batch size and worker count
            seeds = [s.seed * 1_000_003 + j for j in range(i, min(i + batch, stop))]
            yield quantize(family.sample(ema, stage, seeds)).numpy()
    elif s.kind in ("reconstructions", "translations"):
        family, stage, ema, _ = load_generator(s.path)
        fn = family.reconstruct if s.kind == "reconstructions" else \
            (lambda e, x: family.translate_images(e, stage, x, s.direction or None))
        for imgs, _ in iter_split(s.source, s.split, batch, start=start, stop=stop):
            with torch.inference_mode():
                yield quantize(fn(ema, to_model_input(imgs, stage.resolution))).numpy()
    else:
        raise ValueError(f"unknown image set kind {s.kind}")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, min_size: int = 32) -> None:
    """Images in [-1,1] -> a PNG grid; tiny images are enlarged (nearest) so they can be seen."""
    from torchvision.utils import save_image

    if images.shape[-1] < min_size:
        images = torch.nn.functional.interpolate(images, scale_factor=min_size // images.shape[-1], mode="nearest")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.add(1).div(2).clamp(0, 1), str(path), nrow=nrow, padding=1)


def _features_of_slice(s: ImageSet, start: int, stop: int, protocol: str, batch: int, bar=None) -> np.ndarray:
    ex = FeatureExtractor(protocol, batch)
    feats = []
    for imgs in _read_slice(s, start, stop, batch):
        feats.append(ex(imgs))
        if bar is not None:
            bar.update(len(imgs))
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


class _FeatureWorker:
    """A Ray actor holding one feature extractor, fed slices of an image set (the bar counts images)."""

    def __init__(self, protocol: str, batch: int):
        self.protocol, self.batch = protocol, batch

    def run(self, s: ImageSet, start: int, stop: int) -> np.ndarray:
        return _features_of_slice(s, start, stop, self.protocol, self.batch)


def extract_features(s: ImageSet, protocol: str = "tf1", *, workers: int = 1, batch_size: int = 50,
                     progress: bool = True, runtime: RuntimeParams | None = None) -> np.ndarray:
    """Features of every image of ``s`` in order; with workers > 1, slices go to that many Ray actors (on the
    Ray that ``runtime`` names, when this process has not started one). The progress bar counts images."""
    from ganforge.tasks.console import bar

    n = s.count
    if n == 0:
        raise ValueError(f"image set {s.path} is empty")
    workers = max(1, min(workers, n))
    log.info("extracting %s features of %d images (%s) on %d worker(s)", protocol, n, s.kind, workers)
    with bar(n, f"features {s.kind}", "img", disable=not progress) as b:
        if workers == 1:
            return _features_of_slice(s, 0, n, protocol, batch_size, b)
        import ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            init_ray(runtime or RuntimeParams())
        step = max(batch_size, -(-n // (workers * 4)))  # a few slices per actor: the bar moves, the load balances
        bounds = [(a, min(n, a + step)) for a in range(0, n, step)]
        actors = [ray.remote(num_cpus=1)(_FeatureWorker).remote(protocol, batch_size) for _ in range(workers)]
        out = []
        try:
            for (a, z), feats in zip(bounds, ActorPool(actors).map(lambda w, ab: w.run.remote(s, *ab), bounds)):
                out.append(feats)
                b.update(z - a)
        finally:
            for w in actors:
                ray.kill(w)
        return np.concatenate(out)


# ----------------------------------------------------------------------------- reference cache


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def reference_features(shards: str | Path, split: str, protocol: str, cache_dir: str | Path, *, workers: int = 1,
                       batch_size: int = 50, progress: bool = True, runtime: RuntimeParams | None = None
                       ) -> dict[str, Any]:
    """Features, float64 stats and labels of a shard split, cached on (manifest hash, split, resolution, protocol,
    count); per-class statistics (intra-class FID) come from the cached features and labels."""
    from ganforge.tasks.shard import manifest_hash, read_manifest

    s = image_set(str(shards), split)
    m = read_manifest(shards)
    key_src = {"manifest_sha256": manifest_hash(shards), "split": split, "resolution": m["resolution"],
               "protocol": protocol, "count": s.count, "weights": "inception-2015-12-05/default_1.pt"}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"ref-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                out = {k: z[k] for k in ("features", "mu", "sigma", "labels")}
            log.info("reference statistics: cache hit %s", path)
            return {**out, "count": s.count, "cache": "hit", "cache_path": str(path), "key": key_src}
        except (OSError, ValueError, KeyError) as e:  # a damaged cache entry is recomputed, not trusted
            log.warning("reference cache %s unreadable (%s); recomputing", path, e)
    feats = extract_features(s, protocol, workers=workers, batch_size=batch_size, progress=progress, runtime=runtime)
    mu, sigma = feature_stats(feats)
    labels = np.concatenate([lab for _, lab in iter_split(shards, split, 1000)]).astype(np.int64)  # per-class FID
    _atomic_save_npz(path, features=feats, mu=mu, sigma=sigma, labels=labels, key=json.dumps(key_src))
    return {"features": feats, "mu": mu, "sigma": sigma, "labels": labels, "count": s.count, "cache": "miss",
            "cache_path": str(path), "key": key_src}


def fid_between(a: str, b: str, protocol: str = "tf1", *, workers: int = 1, batch_size: int = 50,
                split: str = "val", runtime: RuntimeParams | None = None) -> dict[str, Any]:
    sa, sb = image_set(a, split), image_set(b, split)
    fa = extract_features(sa, protocol, workers=workers, batch_size=batch_size, runtime=runtime)
    fb = extract_features(sb, protocol, workers=workers, batch_size=batch_size, runtime=runtime)
    fid = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    return {"fid": fid, "protocol": protocol, "a": sa.describe(), "b": sb.describe()}


