"""Pictures drawn from a trained model beside its sample grid: a family's own figures (StyleGAN's style mixing,
truncation sweep and latent interpolation), written when training ends and by ``ganforge stylemix``.

A model is named by a registry URI (``models:/NAME@alias``, ``models:/NAME/3``) or by a checkpoint folder; either
way the family comes from the model itself, not from the caller's params."""

from __future__ import annotations

import logging
from pathlib import Path

from ganforge.tasks.checkpoint import load_generator
from ganforge.tasks.errors import InputError, RegistryError
from ganforge.tasks.export import load_export
from ganforge.tasks.images import save_grid

log = logging.getLogger("ganforge.figures")


def load_model(ref: str | Path):
    """(family, stage, EMA modules) of a registered model URI or a checkpoint folder."""
    ref = str(ref)
    if ref.startswith(("models:/", "runs:/")):
        import mlflow.artifacts

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except Exception as e:  # noqa: BLE001 - MlflowException for an unknown name / version / alias
            raise RegistryError(f"no registered model at {ref}: {str(e).splitlines()[0][:200]}") from None
        weights, config = next(local.rglob("weights.pt"), None), next(local.rglob("config.json"), None)
        if weights is None or config is None:
            raise InputError(f"{ref} is not a ganforge model (no weights.pt / config.json among its artifacts)")
        return load_export(weights, config)
    family, stage, ema, _ = load_generator(ref)
    return family, stage, ema


def write_figures(checkpoint: str | Path, out_dir: str | Path, seeds: list[int]) -> list[Path]:
    """The family's figures of ``checkpoint`` as PNGs in ``out_dir`` (none for a family without figures)."""
    family, stage, ema = load_model(checkpoint)
    out = []
    for name, (images, nrow) in family.figures(ema, stage, seeds).items():
        path = Path(out_dir) / f"{stage.name}-{name}.png"
        save_grid(images.cpu(), path, nrow=nrow)
        out.append(path)
    return out


def stylemix(model: str, rows: list[int], cols: list[int], layers: str, out: str | Path,
             truncation: float | None = None) -> dict:
    """The style-mixing figure of a StyleGAN / StyleGAN2 model: row sources, column sources, and row i's image
    with the styles ``layers`` (coarse | middle | fine | A-B) taken from column j."""
    if not rows or not cols:
        raise InputError("stylemix needs at least one row seed and one column seed (--rows 1,2,3 --cols 4,5)")
    family, stage, ema = load_model(model)
    if not getattr(family, "style_family", False):
        raise InputError(f"stylemix needs a StyleGAN or StyleGAN2 model; {model} is a {family.name} model "
                         f"(family {family.name})")
    try:
        images, nrow = family.style_mix(ema, stage, rows, cols, layers, truncation)
    except ValueError as e:
        raise InputError(f"--layers: {e}" if "layers" in str(e) or "styles" in str(e) else str(e)) from None
    save_grid(images.cpu(), out, nrow=nrow)
    swapped = family.layer_range(layers, stage)
    log.info("style mixing of %s (%s, %dpx): styles %d-%d from the columns -> %s", model, family.name,
             stage.resolution, swapped.start, swapped.stop - 1, out)
    return {"model": model, "family": family.name, "rows": rows, "cols": cols, "layers": layers,
            "styles": [swapped.start, swapped.stop - 1], "out": str(out)}
