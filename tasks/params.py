"""params.yaml: the one source of parameters, parsed once into typed objects.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key
fails before any compute with a message naming the key. Inner code receives
these objects, never raw dicts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
# GANFORGE__RUNTIME__RAY_ADDRESS=ray-head:6379 sets runtime.ray_address (after the file, before --set / UI
# overrides): how containers and pods get their cluster settings without a params.yaml of their own.
ENV_PREFIX = "GANFORGE__"


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the key."""


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError(f"both betas must be in [0, 1), got {v}")
    return v


Betas = Annotated[tuple[float, float], AfterValidator(_check_betas)]  # Adam's (beta1, beta2)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Section):
    source: str = Field("digits", description="image folder, .zip, 'digits', 'synthetic:<kind>[:N]' or 'torchvision:<NAME>'")
    shards: str = Field("data/shards", description="output folder of the WebDataset shards and manifest.json")
    resolution: int = Field(32, ge=4, le=4096, description="square output resolution, a power of two")
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out fraction for evaluation references")
    workers: int = Field(2, ge=1, le=256, description="decode/resize processes")
    seed: int = Field(0, ge=0)
    image_format: Literal["npy", "png"] = Field(
        "npy", description="lossless sample encoding: raw uint8 .npy (decode-free) or PNG"
    )
    download: bool = Field(False, description="allow torchvision datasets to download (network)")
    torchvision_root: str = Field("data/torchvision", description="where torchvision datasets live")

    @field_validator("resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not _is_pow2(v):
            raise ValueError(f"must be a power of two (4, 8, 16, 32, ...), got {v}")
        return v


class ProGANParams(_Section):
    start_resolution: int = Field(4, ge=4, description="first stage's resolution (power of two)")
    latent_dim: int = Field(128, ge=1)
    fmap_base: int = Field(2048, ge=8, description="channels at 4x4 before the cap; halves per doubling")
    fmap_max: int = Field(128, ge=4, description="channel cap (512 in the paper; small for laptops)")
    fmap_min: int = Field(16, ge=1)
    transition_kimg: float = Field(4.0, ge=0, description="thousands of images over which alpha rises 0->1")
    stabilize_kimg: float = Field(4.0, gt=0, description="thousands of images at alpha=1 after the transition")
    loss: Literal["wgan-gp", "logistic-r1"] = "wgan-gp"
    lr: float = Field(1e-3, gt=0)
    betas: Betas = (0.0, 0.99)
    gp_lambda: float = Field(10.0, ge=0)
    drift: float = Field(0.001, ge=0, description="epsilon-drift penalty on D(real)^2")
    r1_gamma: float = Field(10.0, ge=0)
    minibatch_std_group: int = Field(4, ge=1)

    @field_validator("start_resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not _is_pow2(v):
            raise ValueError(f"must be a power of two, got {v}")
        return v



class VQGANParams(_Section):
    """VQ-GAN: autoencoder (stage 1) -> code extraction (stage 2) -> transformer prior (stage 3)."""

    # autoencoder
    ch: int = Field(32, ge=4, description="base channels of encoder/decoder")
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 2],
                               description="channel multiplier per level; downsampling factor f = 2^(len-1)")
    num_res_blocks: int = Field(1, ge=1)
    attention: bool = Field(True, description="self-attention at the lowest resolution")
    z_channels: int = Field(32, ge=1)
    embed_dim: int = Field(32, ge=1, description="codebook vector dimension d")
    n_embed: int = Field(128, ge=2, le=32767, description="codebook size K")
    beta: float = Field(0.25, ge=0, description="commitment weight")
    legacy_beta: bool = Field(False, description="taming's legacy loss: beta on the codebook term instead")
    restart_every: int = Field(100, ge=0, description="steps between dead-code restarts (0: never)")
    lr: float = Field(2e-4, gt=0)
    betas: Betas = (0.5, 0.9)
    disc_start: int = Field(500, ge=0, description="steps before the PatchGAN loss switches on")
    disc_weight: float = Field(0.8, ge=0, description="factor on the adaptive GAN weight")
    disc_ch: int = Field(32, ge=4)
    disc_layers: int = Field(2, ge=1)
    perceptual_weight: float = Field(1.0, ge=0)
    lpips_vgg_path: str | None = Field(None, description="torchvision VGG16 state dict for LPIPS; None: L1 only")
    lpips_lin_path: str | None = Field(None, description="LPIPS linear heads (lpips' weights/v0.1/vgg.pth)")
    autoencoder_kimg: float = Field(20.0, gt=0, description="thousands of images for stage 1")
    ema: bool = Field(False, description="keep EMA copies (uses train.ema_half_life_kimg)")
    # tokens
    token_workers: int = Field(2, ge=1, description="Ray tasks encoding shards in stage 2")
    # prior
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    prior_classes: int = Field(0, ge=0, description="0: unconditional; N: class-conditional on labels 0..N-1")
    prior_lr: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW, on linear weights only")
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0: off")
    prior_kimg: float = Field(20.0, gt=0, description="thousands of token grids for stage 3")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)

    @field_validator("ch_mult")
    @classmethod
    def _mult(cls, v: list[int]) -> list[int]:
        if not v or any(m < 1 for m in v):
            raise ValueError(f"must be a non-empty list of positive integers, got {v}")
        return v


    @model_validator(mode="after")
    def _heads(self) -> "VQGANParams":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class TrainParams(_Section):
    family: Literal["progan", "vqgan"] = Field("progan", description="GAN family")
    out: str = Field("runs/demo", description="run folder: checkpoints, samples, summary.json")
    resolution: int = Field(32, ge=4, description="final resolution (power of two, <= the shards' resolution)")
    workers: int = Field(2, ge=1, description="Ray Train workers per stage")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(1, ge=-1, description="worker-group restarts per stage (-1: unlimited)")
    batch_size: int = Field(32, ge=2, description="global batch (split over workers)")
    checkpoint_kimg: float = Field(2.0, gt=0, description="checkpoint + sample grid interval, thousands of images")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per Ray worker")
    xflip: bool = False
    seed: int = Field(0, ge=0)
    amp: bool = Field(True, description="bf16/fp16 autocast when a GPU is used")
    grid_size: int = Field(8, ge=1, le=32, description="sample grid is grid_size x grid_size")
    ema_half_life_kimg: float = Field(10.0, gt=0, description="half-life of the generator EMA, thousands of images")
    checkpoints_to_keep: int | None = Field(None, ge=1, description="per stage; None keeps all")
    progan: ProGANParams = ProGANParams()
    vqgan: VQGANParams = VQGANParams()

    @field_validator("resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not _is_pow2(v):
            raise ValueError(f"must be a power of two (4, 8, 16, 32, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _stages(self) -> "TrainParams":
        f = 2 ** (len(self.vqgan.ch_mult) - 1)
        if self.family == "vqgan" and self.resolution // f < 2:
            raise ValueError(f"train.vqgan.ch_mult downsamples by {f}: too much for train.resolution {self.resolution}")
        if self.family == "vqgan" and self.resolution < 3 * 2**self.vqgan.disc_layers:
            raise ValueError(f"train.vqgan.disc_layers={self.vqgan.disc_layers} is too deep for {self.resolution}px "
                             f"images (the PatchGAN needs resolution >= 3 * 2^disc_layers)")
        if self.family == "progan" and self.progan.start_resolution > self.resolution:
            raise ValueError(
                f"train.progan.start_resolution ({self.progan.start_resolution}) exceeds "
                f"train.resolution ({self.resolution})"
            )
        return self


class EvalParams(_Section):
    metrics: list[Literal["fid", "kid", "is"]] = Field(default_factory=lambda: ["fid", "kid"])
    protocol: Literal["tf1", "clean"] = Field("tf1", description="tf1: published FID protocol; clean: PIL bicubic")
    num_samples: int = Field(2000, ge=2, description="generated images per evaluation")
    split: Literal["train", "val"] = "val"
    batch_size: int = Field(50, ge=1)
    workers: int = Field(2, ge=1, description="Ray workers for feature extraction")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    is_splits: int = Field(10, ge=1)
    inception_logits_path: str | None = Field(
        None, description="1008-way Inception logits weights (TorchScript) for IS; IS is null when absent"
    )
    cache_dir: str = Field(".cache/ganforge/fid-stats", description="reference statistics cache")
    seed: int = Field(123, ge=0)


class RegistryParams(_Section):
    model_name: str | None = Field(None, description="registered name; default ganforge-<family>")
    min_improvement: float = Field(0.0, ge=0, description="FID must drop by at least this to take 'champion'")
    challenger_alias: str = "challenger"
    champion_alias: str = "champion"


class RuntimeParams(_Section):
    ray_address: str | None = Field(None, description="None: local Ray; 'auto' or ray://host:port for a cluster")
    ray_storage: str | None = Field(
        None, description="Ray Train storage root (shared folder or s3://...); None: RUN_DIR/ray"
    )
    mlflow_tracking_uri: str = Field("sqlite:///mlflow.db")
    mlflow_artifact_root: str = Field("mlartifacts", description="artifact root for new experiments")
    mlflow_experiment: str = "ganforge"
    prefect_api_url: str | None = Field(None, description="None: Prefect's local server")
    dvc_remote: str | None = Field(None, description="DVC remote URL (local folder, s3://...)")
    s3_endpoint_url: str | None = None


class Params(_Section):
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    registry: RegistryParams = RegistryParams()
    runtime: RuntimeParams = RuntimeParams()

    def section_hash(self, *sections: str) -> str:
        """Content hash of some sections, for caches keyed on what a task reads."""
        import hashlib

        blob = json.dumps({s: getattr(self, s).model_dump(mode="json") for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid parameters in {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ParamsError(f"--set {dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", yaml-typed value)."""
    if "=" not in text:
        raise ParamsError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ParamsError(f"--set expects key.path=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key, value


def load_params(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Read params.yaml (or the defaults when it is absent and no path was named), apply overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None or DEFAULT_PARAMS.exists():
        p = Path(path) if path is not None else DEFAULT_PARAMS
        if not p.exists():
            raise ParamsError(f"params file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ParamsError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw, origin = loaded, str(p)
    env_items = [(k[len(ENV_PREFIX):].lower().replace("__", "."), yaml.safe_load(v) if v.strip() else "")
                 for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX)]
    if env_items:
        origin = f"{origin} + GANFORGE__* environment"
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in env_items:
        _set_path(raw, key, value)
    for key, value in items:
        _set_path(raw, key, value)
        origin = f"{origin} (with overrides)" if "overrides" not in origin else origin
    return validate_params(raw, origin)


def validate_params(raw: dict[str, Any], origin: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_error(e, origin)) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"a.b.c": value} (the keys --set and MLflow params use)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
