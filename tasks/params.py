"""params.yaml: the one source of parameters, parsed once into typed objects.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key
fails before any compute with a message naming the key. Inner code receives
these objects, never raw dicts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from ganforge.tasks.errors import GanforgeError
from ganforge.models.augment import ADAPTIVE_AUGMENTATIONS, AdaParams, DiffusionParams, check_augment
from ganforge.models.family import Pow2, Section
from ganforge.models.families import family_class, family_classes
from ganforge.tasks.metrics import METRICS, load_metric_plugins

load_metric_plugins()
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]

DEFAULT_PARAMS = Path("params.yaml")
# GANFORGE__RUNTIME__RAY_ADDRESS=ray-head:6379 sets runtime.ray_address (after the file, before --set / UI
# overrides): how containers and pods get their cluster settings without a params.yaml of their own.
ENV_PREFIX = "GANFORGE__"


class ParamsError(GanforgeError, ValueError):
    """A params file or override is invalid; the message names the key."""

    exit_code = 2
    retryable = False


_Section = Section  # every params section forbids unknown keys


class DataParams(_Section):
    source: str = Field("digits", description="image folder, .zip, 'digits', 'synthetic:KIND[:N]', 'photo:china|flower[:N]' "
                                              "or 'torchvision:NAME'")
    source_b: str | None = Field(
        None, description="unpaired translation (CycleGAN): domain B, any source as above, and the source is domain "
                          "A; a source folder in CycleGAN's trainA/ trainB/ testA/ testB/ layout needs none")
    shards: str = Field("data/shards", description="output folder of the WebDataset shards and manifest.json")
    resolution: Pow2 = Field(32, ge=4, le=4096, description="square output resolution, a power of two")
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out fraction for evaluation references")
    workers: int = Field(2, ge=1, le=256, description="decode/resize processes")
    seed: int = Field(0, ge=0, description="seed of the train/val split and the shard order")
    image_format: Literal["npy", "png"] = Field(
        "npy", description="lossless sample encoding: raw uint8 .npy (decode-free) or PNG"
    )
    download: bool = Field(False, description="allow torchvision datasets to download (network)")
    torchvision_root: str = Field("data/torchvision", description="where torchvision datasets live")
    max_train_images: int | None = Field(
        None, ge=1, description="keep only the first N train images of the seeded order (small-data experiments); "
                                "the val split is unchanged; null: all")
    labelled_per_class: int | None = Field(
        None, ge=1, description="semi-supervised data: also write a 'labelled' split of this many train images per "
                                "class (deterministic, class-balanced); null: none")
    max_file_mib: float = Field(256, gt=0, description="a file (or .zip member) larger than this is skipped unread; "
                                                     "the rest is read within it, so hostile input cannot exhaust memory")
    min_image_side: int = Field(8, ge=1, description="an image whose shorter side is below this is skipped (not "
                                                     "upscaled from a few pixels)")
    max_aspect: float = Field(4.0, ge=1, description="images longer than this ratio (the square crop keeps a small "
                                                     "part) are counted in the manifest and warned about")
    follow_links: bool = Field(False, description="follow symbolic links in a source folder that point out of it "
                                                  "(never followed by default; each one is listed as skipped)")


class _TrainBase(_Section):
    """What every family shares; the family sections (train.<family>) are added from the registry below."""

    out: str = Field("runs/demo", description="run folder: checkpoints, samples, summary.json")
    resolution: Pow2 = Field(32, ge=4, description="final resolution (power of two, <= the shards' resolution)")
    workers: int = Field(2, ge=1, description="Ray Train workers per stage")
    gpus_per_worker: float = Field(0, ge=0, description="0: CPU workers (gloo); 1: one GPU each (NCCL)")
    cpus_per_worker: float = Field(1, gt=0, description="CPU cores each worker reserves (and its torch threads)")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts per stage (-1: unlimited)")
    batch_size: int = Field(32, ge=2, description="global batch (split over workers)")
    checkpoint_kimg: float = Field(2.0, gt=0, description="checkpoint + sample grid interval, thousands of images")
    log_every: int = Field(10, ge=1, description="steps between metric rows (loss history, progress)")
    report_interval_s: float = Field(
        5.0, ge=0, description="least seconds between a worker's Ray Train reports; the rows in between travel "
                               "together (Ray Train takes one report per 2 s poll: reporting more often makes "
                               "every worker wait); 0: every row")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per Ray worker")
    xflip: bool = Field(False, description="random horizontal flips of real images")
    augment: Literal["none", "diffaugment", "ada", "diffusion"] = Field(
        "none", description="augmentation of what every discriminator sees, for small datasets: DiffAugment, ADA "
                            "(adaptive p, train.ada) or Diffusion-GAN (adaptive T, train.diffusion)")
    ada: AdaParams = Field(default_factory=AdaParams, description="ADA's target, speed and transforms")
    diffusion: DiffusionParams = Field(default_factory=DiffusionParams,
                                       description="Diffusion-GAN's schedule, target and speed")
    seed: int = Field(0, ge=0, description="seed of initialisation, latents and data order (resume-exact)")
    amp: bool = Field(True, description="bf16/fp16 autocast when a GPU is used")
    grid_size: int = Field(8, ge=1, le=32, description="sample grid is grid_size x grid_size")
    ema_half_life_kimg: float = Field(10.0, gt=0, description="half-life of the generator EMA, thousands of images")
    checkpoints_to_keep: int | None = Field(None, ge=1, description="per stage; None keeps all")

    @model_validator(mode="after")
    def _family_checks(self) -> "_TrainBase":
        cls = family_class(self.family)
        if self.augment in ADAPTIVE_AUGMENTATIONS and not cls.adaptive_augment:
            able = ", ".join(n for n, c in family_classes().items() if c.adaptive_augment)
            raise ValueError(f"train.augment {self.augment} adapts to the discriminator's outputs on real images, "
                             f"which family {self.family} does not report: use it with {able}, or "
                             f"train.augment diffaugment")
        check_augment(self)
        cls.check_params(self, getattr(self, self.family))
        return self


def _train_params_model() -> type[_TrainBase]:
    """train: the shared keys, ``family`` (a drop-down of every registered family) and one section per family."""
    classes = family_classes()
    names = tuple(classes)
    fields: dict[str, Any] = {
        "family": (Literal[names], Field("progan" if "progan" in names else names[0],  # type: ignore[valid-type]
                                         description="GAN family: " + ", ".join(names))),
    }
    for name, cls in classes.items():
        doc = (cls.Params.__doc__ or cls.__doc__ or name).strip().splitlines()[0]
        fields[name] = (cls.Params, Field(default_factory=cls.Params, title=name, description=doc))
    return create_model("TrainParams", __base__=_TrainBase, __module__=__name__, **fields)


TrainParams = _train_params_model()


class EvalResources(_Section):
    cpus: float = Field(1.0, ge=0, description="CPUs per scoring task (on a laptop with none free, it shares)")
    gpus: float = Field(0.0, ge=0, description="GPUs per scoring task")


class EvalParams(_Section):
    metrics: list[MetricName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["fid", "kid", "precision", "recall", "density", "coverage"],
        description="sample metrics, by registered name")
    protocol: Literal["tf1", "clean"] = Field("tf1", description="tf1: published FID protocol; clean: PIL bicubic")
    num_samples: int = Field(2000, ge=2, description="generated images per evaluation")
    split: Literal["train", "val"] = Field("val", description="the reference split real statistics come from")
    batch_size: int = Field(50, ge=1, description="images per Inception forward pass")
    workers: int = Field(2, ge=1, description="Ray workers for feature extraction")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset (capped by the set sizes)")
    is_splits: int = Field(10, ge=1, description="IS: folds for the mean and std")
    inception_logits_path: str | None = Field(
        None, description="1008-way Inception logits weights (TorchScript) for IS; IS is null when absent"
    )
    cache_dir: str = Field(".cache/ganforge/fid-stats", description="reference statistics cache")
    seed: int = Field(123, ge=0, description="seed of the generated samples (one per index) and KID subsets")
    every_kimg: float | None = Field(
        None, gt=0, description="score checkpoints every this many kimg beside training (an FID-vs-kimg curve over "
                                "all stages, as its own Ray task); null: off")
    every_num_samples: int = Field(1000, ge=2, description="curve: generated images per scored checkpoint")
    every_protocol: Literal["tf1", "clean"] | None = Field(None, description="curve: protocol; null: eval.protocol")
    every_metrics: list[MetricName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["fid"], min_length=1,
        description="curve: metrics per scored checkpoint; the first picks the best checkpoint")
    resources: EvalResources = Field(default_factory=lambda: EvalResources(),
                                     description="curve: what each scoring task asks Ray for")
    pr_k: int = Field(3, ge=1, description="precision/recall: the k of the k-NN balls (Kynkäänniemi et al.: 3)")
    dc_k: int = Field(5, ge=1, description="density/coverage: the k of the k-NN balls (Naeem et al.: 5)")
    class_min_images: int = Field(
        50, ge=2, description="intra-class FID: classes with fewer reference images or samples are reported, "
                              "not averaged in")


class RegistryParams(_Section):
    model_name: str | None = Field(None, description="registered name; default ganforge-FAMILY")
    gate_metric: str | None = Field(None, description="the evaluation number the champion gate compares (fid, kid, "
                                                      "is, rfid, a family's own score such as accuracy); null: the "
                                                      "family's (FID for generators, accuracy for classifiers)")
    gate_direction: Literal["lower", "higher"] | None = Field(
        None, description="which way gate_metric improves; null: as its metric declares")
    min_improvement: float = Field(0.0, ge=0, description="gate_metric must improve by at least this to take 'champion'")
    checkpoint: Literal["last", "best"] = Field(
        "last", description="what the flow evaluates and registers: the last checkpoint, or the best on the "
                            "eval.every_kimg curve (RUN_DIR/best)")
    challenger_alias: str = Field("challenger", description="alias every new version gets")
    champion_alias: str = Field("champion", description="alias the gate moves to a better version")


# Each tool's own variable beats a params *default*, never a value set in params.yaml, --set or the UI. Read as
# the user's shell set them, when ganforge is imported: MLflow itself exports MLFLOW_TRACKING_URI later.
STANDARD_ENV = {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "prefect_api_url": "PREFECT_API_URL",
                "ray_address": "RAY_ADDRESS"}
_USER_ENV = {field: (os.environ.get(var) or "").strip() for field, var in STANDARD_ENV.items()}


class RuntimeParams(_Section):
    """Where things run and are recorded. ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL`` and ``RAY_ADDRESS``
    take the place of a default here; a value set in params wins over them."""

    ray_address: str | None = Field(None, description="None: local Ray; 'auto' or ray://host:port for a cluster")
    ray_storage: str | None = Field(
        None, description="Ray Train storage root (shared folder or s3://...); None: RUN_DIR/ray"
    )
    ray_dashboard: bool = Field(False, description="with a local Ray: also start Ray's dashboard "
                                "(http://127.0.0.1:8265); it adds seconds and processes to every start")
    mlflow_tracking_uri: str = Field("sqlite:///mlflow.db", description="sqlite file, or http(s)://tracking-server")
    mlflow_artifact_root: str = Field("mlartifacts", description="artifact root for new experiments")
    mlflow_experiment: str = Field("ganforge", description="experiment runs are logged to")
    prefect_api_url: str | None = Field(None, description="None: Prefect's local server")
    dvc_remote: str | None = Field(None, description="DVC remote URL (local folder, s3://...)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...); None: AWS")

    @model_validator(mode="after")
    def _standard_environment(self):
        for field in STANDARD_ENV:
            if _USER_ENV[field] and getattr(self, field) == type(self).model_fields[field].default:
                self.__dict__[field] = _USER_ENV[field]
        return self

    def source(self, field: str) -> str:
        """Where the value of ``field`` came from: its environment variable, params, or the default."""
        value = getattr(self, field)
        if field in STANDARD_ENV and _USER_ENV[field] and value == _USER_ENV[field]:
            return f"{STANDARD_ENV[field]} in the environment"
        return "the default" if value == type(self).model_fields[field].default else "params"


class Params(_Section):
    data: DataParams = Field(default_factory=DataParams, title="data",
                             description="the image source and its WebDataset shards")
    train: TrainParams = Field(default_factory=TrainParams, title="train",  # type: ignore[valid-type]
                               description="training: the family, its section, Ray Train workers, checkpoints")
    eval: EvalParams = Field(default_factory=EvalParams, title="eval", description="FID / KID / IS evaluation")
    registry: RegistryParams = Field(default_factory=RegistryParams, title="registry",
                                     description="the MLflow model registry and the champion gate")
    runtime: RuntimeParams = Field(default_factory=RuntimeParams, title="runtime",
                                   description="where things run: Ray, MLflow, Prefect, DVC, S3")

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


def _section_keys(name: str) -> list[str]:
    ann = Params.model_fields[name].annotation
    return list(getattr(ann, "model_fields", {}))


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


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content (an empty file is ``{}``): one line naming the file when it is missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None


def load_params(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Read params.yaml (or the defaults when it is absent and no path was named), apply overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None or DEFAULT_PARAMS.exists():
        p = Path(path) if path is not None else DEFAULT_PARAMS
        loaded = read_yaml(p, "params file")
        if not isinstance(loaded, dict):
            raise ParamsError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw, origin = loaded, str(p)
        for name, value in raw.items():  # `data: 5` would otherwise surface as a puzzling --set error
            if name in Params.model_fields and not isinstance(value, dict) and value is not None:
                raise ParamsError(f"{p}: {name} must be a section (keys under it, e.g. {name}.{next(iter(_section_keys(name)), 'key')}), "
                                  f"got {value!r}")
            if value is None:
                raw[name] = {}  # an empty section (`data:`) means its defaults
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
