"""Image sources for sharding: enumerate candidates, load one, normalise it to RGB.

A source is described by a string (``data.source`` / ``--source``):

- a folder of images (recursive; first-level subfolders become class labels),
- a ``.zip`` of images (same layout rules inside the archive),
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (real, offline),
- ``synthetic:<kind>[:N]``: deterministic generated images (``shapes``, ``gradients``),
- ``torchvision:<NAME>``: a torchvision dataset; downloads only when allowed,
- ``photo:<china|flower>[:N]``: N seeded random crops of one of scikit-learn's two bundled real photographs
  (the offline two-domain demo: ``--source photo:china --source-b photo:flower``).

Candidates are picklable so decoding can run in worker processes.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SYNTHETIC_KINDS = ("shapes", "gradients")
PHOTOS = ("china", "flower")  # scikit-learn's load_sample_images (427 x 640 JPEGs in its wheel)
RESIZE_FILTER = "PIL.Image.LANCZOS (antialiased), after a centred square crop"


class SourceError(ValueError):
    """The source cannot be read at all (missing, empty, offline)."""


class DecodeError(ValueError):
    """One candidate cannot become an image; the message is already its skip reason."""


@dataclass(frozen=True)
class Candidate:
    """One would-be sample: where it comes from and how to get its pixels."""

    ref: str  # human-readable origin, reported in manifest['skipped']
    label: int | None
    kind: str  # "file" | "zip" | "array" | "synthetic" | "photo"
    locator: Any  # path / (zip, member) / uint8 array / (kind, index, seed)


@dataclass
class SourceListing:
    candidates: list[Candidate]
    classes: list[str]
    skipped: list[dict[str, str]]  # files rejected before decoding (e.g. extension)


def _labels_for(rel_paths: list[PurePosixPath]) -> tuple[list[str], dict[str, int]]:
    """First-level subfolders are classes, but only when every image lives in one."""
    if rel_paths and all(len(p.parts) >= 2 for p in rel_paths):
        classes = sorted({p.parts[0] for p in rel_paths})
        return classes, {c: i for i, c in enumerate(classes)}
    return [], {}


def _from_paths(rel: list[PurePosixPath], make) -> SourceListing:
    skipped, images = [], []
    for p in sorted(rel, key=str):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            skipped.append({"path": str(p), "reason": f"not an image file (extension {p.suffix or 'none'!r})"})
    classes, index = _labels_for(images)
    cands = [make(p, index[p.parts[0]] if index else None) for p in images]
    return SourceListing(cands, classes, skipped)


def _count(parts: list[str], default: int, what: str) -> int:
    """The optional ``:N`` of ``kind:name[:N]`` sources (at least 1)."""
    try:
        n = int(parts[2]) if len(parts) > 2 else default
    except ValueError:
        raise SourceError(f"{what} must be an integer, got {parts[2]!r}") from None
    if n < 1:
        raise SourceError(f"{what} must be >= 1, got {n}")
    return n


def _walk(root: Path, follow_links: bool) -> tuple[list[PurePosixPath], list[dict[str, str]]]:
    """The files under a source folder, and the symbolic links not taken, each with its reason. A link to a
    file inside the folder is taken; a link out of it only with ``follow_links`` (a user's folder must not pull
    in whatever this process can read); a dangling link, or a link to a folder, never (no cycles)."""
    files, skipped = [], []
    real_root = root.resolve()
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                skipped.append({"path": (here / name).relative_to(root).as_posix(),
                                "reason": "symbolic link to a folder (not followed)"})
        for name in names:
            p = here / name
            rel = PurePosixPath(p.relative_to(root).as_posix())
            if p.is_symlink():
                try:
                    target = p.resolve(strict=True)
                except (FileNotFoundError, RuntimeError, OSError):
                    skipped.append({"path": str(rel), "reason": "dangling symbolic link"})
                    continue
                if not target.is_file():
                    skipped.append({"path": str(rel), "reason": "symbolic link to something other than a file"})
                    continue
                if not target.is_relative_to(real_root) and not follow_links:
                    skipped.append({"path": str(rel), "reason": "symbolic link out of the source folder (not "
                                                                "followed; data.follow_links: true follows it)"})
                    continue
            elif not p.is_file():
                skipped.append({"path": str(rel), "reason": "not a regular file"})
                continue
            files.append(rel)
    return files, skipped


def list_source(source: str, *, download: bool = False, torchvision_root: str = "data/torchvision",
                follow_links: bool = False) -> SourceListing:
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        cands = [Candidate(f"digits[{i}]", int(t), "array", imgs[i]) for i, t in enumerate(d.target)]
        return SourceListing(cands, [str(c) for c in d.target_names], [])
    if source.startswith("synthetic:"):
        parts = source.split(":")
        kind = parts[1]
        if kind not in SYNTHETIC_KINDS:
            raise SourceError(f"unknown synthetic kind {kind!r}; allowed: {', '.join(SYNTHETIC_KINDS)}")
        n = _count(parts, 512, "synthetic count")
        classes = ["circle", "square", "triangle"] if kind == "shapes" else []
        cands = [
            Candidate(f"{kind}[{i}]", (i % 3) if classes else None, "synthetic", (kind, i)) for i in range(n)
        ]
        return SourceListing(cands, classes, [])
    if source.startswith("photo:"):
        parts = source.split(":")
        if parts[1] not in PHOTOS:
            raise SourceError(f"unknown photo {parts[1]!r}; allowed: {', '.join(PHOTOS)} (scikit-learn's sample images)")
        n = _count(parts, 1000, "photo crop count")
        return SourceListing([Candidate(f"{parts[1]}[{i}]", None, "photo", (parts[1], i)) for i in range(n)], [], [])
    if source.startswith("torchvision:"):
        return _torchvision(source.split(":", 1)[1], download, torchvision_root)

    path = Path(source)
    if not path.exists():
        raise SourceError(
            f"source {source!r} not found: expected an image folder, a .zip, 'digits', "
            f"'synthetic:<{'|'.join(SYNTHETIC_KINDS)}>[:N]', 'photo:<{'|'.join(PHOTOS)}>[:N]' or 'torchvision:<NAME>'"
        )
    if path.is_dir():
        rel, links = _walk(path, follow_links)
        if not rel and not links:
            raise SourceError(f"source folder {source!r} is empty")
        listing = _from_paths(rel, lambda p, lab: Candidate(str(p), lab, "file", str(path / p)))
        listing.skipped.extend(links)
        return listing
    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as e:
            raise SourceError(f"{source!r} is not a readable zip archive: {e}") from None
        if not names:
            raise SourceError(f"zip archive {source!r} holds no files")
        rel = [PurePosixPath(n) for n in names]
        return _from_paths(rel, lambda p, lab: Candidate(str(p), lab, "zip", (str(path), str(p))))
    raise SourceError(f"source {source!r} is a file but not a .zip archive")


def _torchvision(name: str, download: bool, root: str) -> SourceListing:
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        raise SourceError(f"torchvision has no dataset named {name!r} (e.g. CIFAR10, MNIST, FashionMNIST, STL10)")
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"root": root, "download": download}
    if "train" in params:
        kwargs["train"] = True
    elif "split" in params:
        kwargs["split"] = "train"
    try:
        ds = cls(**kwargs)
    except RuntimeError as e:
        if not download:
            raise SourceError(
                f"torchvision dataset {name} is not in {root!r} and downloading is off; "
                f"pass --download (needs network) or copy the files there ({e})"
            ) from None
        raise SourceError(f"torchvision dataset {name} could not be prepared: {e}") from None
    except OSError as e:  # URLError is an OSError: offline with --download
        raise SourceError(f"downloading torchvision dataset {name} failed (offline?): {e}") from None
    classes = [str(c) for c in getattr(ds, "classes", [])]
    cands = []
    for i in range(len(ds)):
        img, target = ds[i]
        arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
        cands.append(Candidate(f"{name}[{i}]", int(target) if classes else None, "array", arr))
    return SourceListing(cands, classes, [])


def _synthetic(kind: str, index: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng([index, 7919])
    if kind == "gradients":
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, size)[None, :, None]
        angle = rng.uniform(0, 1)
        t = t if angle < 0.5 else t.transpose(1, 0, 2)
        arr = (c0 * (1 - t) + c1 * t).repeat(size, axis=0 if angle < 0.5 else 1)
        return Image.fromarray(arr.astype(np.uint8))
    bg = tuple(int(v) for v in rng.integers(0, 96, 3))
    fg = tuple(int(v) for v in rng.integers(128, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    shape = index % 3
    if shape == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


@functools.lru_cache(maxsize=2)
def _photo(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def _photo_crop(name: str, index: int) -> Image.Image:
    """A seeded random square crop of a bundled photo: a side of 1/4 to 1/2 of its height, anywhere in it."""
    img = _photo(name)
    h, w = img.shape[:2]
    rng = np.random.default_rng([index, 104729])
    side = int(rng.integers(h // 4, h // 2 + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(img[y : y + side, x : x + side])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 1.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            scale = 1.0 / 255.0
        arr = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _read_bounded(f, limit: int | None, what: str) -> bytes:
    data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise DecodeError(f"{what} larger than data.max_file_mib ({limit / 2**20:g} MiB)")
    return data


def load_image(c: Candidate, max_bytes: int | None = None) -> Image.Image:
    """Decode one candidate fully (raises on truncated / non-image data). A file or archive member over
    ``max_bytes`` (by its size on disk, its declared size, or what reading it yields) is refused unread."""
    if c.kind == "array":
        arr = np.asarray(c.locator)
        return Image.fromarray(arr)
    if c.kind == "synthetic":
        return _synthetic(*c.locator)
    if c.kind == "photo":
        return _photo_crop(*c.locator)
    if c.kind == "file":
        size = os.stat(c.locator).st_size
        if max_bytes is not None and size > max_bytes:
            raise DecodeError(f"file too large ({size / 2**20:.0f} MiB > data.max_file_mib {max_bytes / 2**20:g})")
        with open(c.locator, "rb") as f:
            data = _read_bounded(f, max_bytes, "file")
    else:
        zpath, member = c.locator
        with zipfile.ZipFile(zpath) as zf:
            declared = zf.getinfo(member).file_size
            if max_bytes is not None and declared > max_bytes:
                raise DecodeError(f"archive member too large ({declared / 2**20:.0f} MiB unpacked > "
                                  f"data.max_file_mib {max_bytes / 2**20:g})")
            with zf.open(member) as f:  # a member may unpack to more than it declares: read within the limit
                data = _read_bounded(f, max_bytes, "archive member")
    if not data:
        raise DecodeError("zero bytes")
    img = Image.open(io.BytesIO(data))
    img.load()  # force full decode: truncated files fail here, not later
    img = ImageOps.exif_transpose(img)
    return img


def prepare(img: Image.Image, resolution: int, min_side: int = 1) -> np.ndarray:
    """RGB, centred square crop, antialiased resize -> HxWx3 uint8; an image whose shorter side is below
    ``min_side`` is refused rather than upscaled from a few pixels."""
    if min(img.size) < min_side:
        raise DecodeError(f"image too small ({img.size[0]}x{img.size[1]}; data.min_image_side is {min_side})")
    try:
        img = to_rgb(img)
    except ValueError:  # PIL: "conversion from X to Y not supported"
        raise DecodeError(f"unsupported mode {img.mode!r} (no conversion to RGB)") from None
    if img.size != (resolution, resolution):
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


_OBJECT_REPR = re.compile(r"<(?:[\w.]*\.)?(\w+)[^<>]*>")  # "<_io.BytesIO object at 0x7f..>" -> "BytesIO"
_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+")


def skip_reason(e: BaseException) -> str:
    """A short, reproducible reason for ``manifest['skipped']``: the class of failure, never an
    object repr, a memory address or an absolute (temporary) path, so reruns give the same manifest."""
    if isinstance(e, DecodeError):
        return str(e)
    if isinstance(e, UnidentifiedImageError):  # its message holds "<_io.BytesIO object at 0x...>"
        return "not a decodable image (PIL: cannot identify image file)"
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (PIL decompression-bomb limit)"
    if isinstance(e, OSError) and e.errno is not None:  # reading failed; str(e) names the absolute path
        return f"cannot read file ({e.strerror or f'errno {e.errno}'})"
    msg = _OBJECT_REPR.sub(r"\1", _ADDRESS.sub("", str(e))).strip()
    if isinstance(e, (OSError, SyntaxError, EOFError)):  # PIL's errors while decoding the pixel data
        if "truncated" in msg.lower():  # "image file is truncated (N bytes not processed)", "Truncated File Read"
            return "truncated image file"
        return f"corrupt image data (PIL: {msg})" if msg else "corrupt image data"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
