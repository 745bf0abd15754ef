"""What a registered model holds, and the one way it is loaded and run.

A model is exported from a checkpoint as data, never code:

- ``weights.pt``: the EMA modules' state dicts and the family's own sampling state (e.g. StyleGAN's w_avg),
  read back with ``torch.load(weights_only=True)``;
- ``config.json``: the export format, the family, the stage, the resolution, the product and the training
  params that rebuild the modules.

``tasks/pyfunc_model.py`` (MLflow models-from-code) loads them with :func:`load_export` and answers with
:func:`predict`; those two names are what a registered model relies on, so they stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ganforge.tasks.checkpoint import build_generator, load_generator
from ganforge.tasks.errors import CheckpointError
from ganforge.tasks.metrics import quantize

FORMAT = 1
WEIGHTS = "weights.pt"
CONFIG = "config.json"


def export_model(checkpoint: str | Path, out: str | Path) -> dict[str, str]:
    """Write ``weights.pt`` and ``config.json`` of ``checkpoint``'s EMA modules into ``out``; returns the
    artifact paths by name (what ``mlflow.pyfunc.log_model(artifacts=...)`` takes)."""
    family, stage, ema, state = load_generator(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": {k: m.state_dict() for k, m in ema.items()}, "family_state": state.get("family_state") or {}},
               out / WEIGHTS)
    config = {"format": FORMAT, "family": family.name, "stage": state["stage"], "resolution": stage.resolution,
              "product": family.product, "num_classes": family.num_classes, "train_params": state["params"]}
    (out / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    return {"weights": str(out / WEIGHTS), "config": str(out / CONFIG)}


def load_export(weights: str | Path, config: str | Path, device: str = "cpu"):
    """(family, stage, EMA modules) of an exported model."""
    try:
        cfg = json.loads(Path(config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"exported model config {config} cannot be read ({e})") from None
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"exported model {config} has format {cfg.get('format')!r}; this ganforge reads "
                              f"format {FORMAT}: upgrade ganforge")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"exported model weights {weights} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    family, stage, ema = build_generator(cfg["train_params"], cfg["stage"], blob["ema"], blob["family_state"],
                                         device)
    return family, stage, ema


def predict(family, stage, ema, model_input, params: dict | None = None) -> np.ndarray:
    """What the registered model does, by the family's product: a generator takes a frame of ``seed`` (and
    optional ``label`` and ``truncation``) and returns uint8 images N x H x W x 3; a translator takes uint8
    images (and, translating between two domains, the param ``direction``: AtoB or BtoA) and returns translated
    ones; a classifier takes uint8 images and returns class probabilities."""
    direction = (params or {}).get("direction")
    if direction is not None and family.product != "translator":
        raise ValueError(f"a {family.product} takes no direction (got {direction!r})")
    if direction is not None and direction not in family.directions:
        allowed = ", ".join(family.directions) or "none: this translator has one direction"
        raise ValueError(f"direction must be one of {allowed}; got {direction!r}")
    if family.product == "generator":
        return predict_images(family, stage, ema, model_input)
    from ganforge.tasks.data import to_model_input

    arr = np.asarray(model_input)
    r = stage.resolution
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] != arr.shape[2] \
            or arr.shape[1] % r:
        raise ValueError(f"{family.product} input must be uint8 images N x H x W x 3 with H = W a multiple of {r}, "
                         f"got {arr.dtype} {arr.shape}")
    x = to_model_input(np.array(arr, copy=True), r)  # a copy: the caller's array may be read-only
    with torch.inference_mode():
        if family.product == "translator":
            return quantize(family.translate_images(ema, stage, x, direction)).numpy()
        if family.product == "classifier":
            return family.classify(ema, stage, x).float().numpy()
    raise ValueError(f"family {family.name} has an unknown product {family.product!r}")


def predict_images(family, stage, ema, model_input) -> np.ndarray:
    """A generator's predict: a frame with ``seed`` and optional ``label`` and ``truncation`` columns."""
    import pandas as pd

    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "seed" not in df:
        raise ValueError("input needs a 'seed' column (one image per seed)")
    labels = None
    if "label" in df and family.num_classes:
        labels = [int(v) if pd.notna(v) else family.label_for(int(s)) for v, s in zip(df["label"], df["seed"])]
    psis = df["truncation"].fillna(1.0).to_numpy(float) if "truncation" in df else np.ones(len(df))
    out = []
    for psi in sorted(set(psis.tolist())):  # one call per truncation value, rows back in input order
        rows = np.flatnonzero(psis == psi)
        imgs = family.sample(ema, stage, [int(df["seed"].iloc[i]) for i in rows],
                             labels=None if labels is None else [labels[i] for i in rows],
                             truncation=None if psi == 1.0 else float(psi))
        out.append((rows, quantize(imgs).numpy()))
    first = out[0][1]
    result = np.empty((len(df), *first.shape[1:]), first.dtype)
    for rows, imgs in out:
        result[rows] = imgs
    return result
