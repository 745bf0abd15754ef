"""`ganforge translate`: a translator's images of a user's own files, by a registered model or a checkpoint.

Each image is read as RGB, brought to the model's resolution the way shards are made (centred square crop,
Lanczos resize; the log says so for every image of another size) and translated by exactly what the registered
model's ``predict`` runs, so the files equal what the pyfunc returns for the same uint8 input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ganforge.tasks.errors import InputError
from ganforge.tasks.export import predict
from ganforge.tasks.figures import load_model
from ganforge.tasks.sources import IMAGE_EXTENSIONS, prepare, skip_reason

log = logging.getLogger("ganforge.translate")


def image_files(path: str | Path) -> list[Path]:
    """The image files of ``path``: itself, or every image under a folder (sorted)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--input {path} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--input {path} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def translate(model: str, inputs: str | Path, out: str | Path, direction: str | None = None) -> dict:
    """Translate every image of ``inputs`` (a file or a folder) into PNGs under ``out`` (same relative names);
    unreadable files are skipped and then named in an InputError, after the others are written."""
    family, stage, ema = load_model(model)
    if family.product != "translator":
        raise InputError(f"{model} is a {family.name} model, a {family.product}: `translate` needs a translator "
                         f"(train.family: cyclegan)")
    if direction is not None and direction not in family.directions:
        allowed = ", ".join(family.directions)
        raise InputError(f"--direction must be one of {allowed}, got {direction!r}" if allowed else
                         f"{model} ({family.name}) translates one way: leave out --direction (got {direction!r})")
    r = stage.resolution
    files = image_files(inputs)
    root = Path(inputs) if Path(inputs).is_dir() else Path(inputs).parent
    out = Path(out)
    written: list[str] = []
    skipped: list[dict] = []
    resized = 0
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                size = img.size
                arr = prepare(img, r)
        except Exception as e:  # noqa: BLE001 - one unreadable file is reported and skipped, not fatal
            skipped.append({"path": str(f), "reason": skip_reason(e)})
            log.warning("skipped %s: %s", f, skipped[-1]["reason"])
            continue
        if size != (r, r):
            resized += 1
            log.info("%s is %dx%d: centre-cropped and resized to this %dpx model's %dx%d", f, *size, r, r, r)
        y = predict(family, stage, ema, arr[None], {"direction": direction} if direction else None)[0]
        rel = f.relative_to(root)
        dst = out / rel.with_suffix(".png")
        if str(dst) in written:  # a.jpg after a.png: keep both (a.jpg.png)
            dst = out / rel.with_name(rel.name + ".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(y)).save(dst)
        written.append(str(dst))
    if not written:
        raise InputError(f"no image of --input {inputs} could be read: "
                         + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]))
    used = direction or (next(iter(family.directions)) if family.directions else None)
    log.info("translated %d image(s) %sinto %s (%d resized, %d skipped)", len(written),
             f"{used} " if used else "", out, resized, len(skipped))
    if skipped:  # the readable ones are written; the run still fails, naming what it could not read
        raise InputError(f"{len(skipped)} of {len(files)} input file(s) could not be read and were skipped ("
                         + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
                         + f"); the other {len(written)} are in {out}")
    return {"model": str(model), "direction": used, "resolution": r, "out": str(out), "translated": len(written),
            "resized": resized, "skipped": skipped}
