"""Sharding: images from any source -> deterministic WebDataset tar shards + manifest.json.

Layout of the output folder::

    DIR/manifest.json
    DIR/train-000000.tar, train-000001.tar, ...
    DIR/val-000000.tar, ...

Each sample holds ``<key>.npy`` (uint8 HxWx3, decode-free) or ``<key>.png``,
``<key>.cls`` (class index, when the source has classes) and ``<key>.json``
(origin). Keys contain no dots. The same source and parameters give
byte-identical shards: inputs are sorted, the shuffle is seeded and tar headers
carry fixed metadata, so DVC hashes are stable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ganforge.tasks.errors import ShardError
from ganforge.tasks.io import sha256_file, staged_dir
from ganforge.tasks.params import DataParams
from ganforge.tasks.sources import RESIZE_FILTER, Candidate, SourceError, list_source, load_image, prepare, skip_reason

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ganforge-shards/1"
SPLITS = ("train", "val")
LABELLED = "labelled"  # semi-supervised data: a copy of N train images per class (data.labelled_per_class)
# DataParams that change how a run goes, never what it writes: left out of the manifest so that,
# e.g., another worker count gives a byte-identical manifest.json (and unchanged manifest_hash).
RUN_ONLY_PARAMS = {"workers"}


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _process(job: tuple[Candidate, int, str, tuple[int, int]]) -> tuple[bytes | None, str | None, float]:
    """One candidate -> (encoded sample, or None and the skip reason; the image's aspect ratio, long:short)."""
    cand, resolution, fmt, (max_bytes, min_side) = job
    try:
        img = load_image(cand, max_bytes)
        aspect = max(img.size) / max(1, min(img.size))
        arr = prepare(img, resolution, min_side)
    except Exception as e:  # noqa: BLE001 - any decode failure is a skip with its reason
        return None, skip_reason(e), 1.0
    return encode_image(arr, fmt), None, aspect


def _limits(data: DataParams) -> tuple[int, int]:
    return int(data.max_file_mib * 2**20), data.min_image_side


def _aspect_report(wide: list[tuple[str, float]], data: DataParams) -> dict:
    """manifest['extreme_aspect']: how many images are longer than data.max_aspect (the centred square crop keeps
    1/ratio of them), with the most extreme few; and one warning line when there are any."""
    wide = sorted(wide, key=lambda w: (-w[1], w[0]))
    if wide:
        log.warning("%d image(s) have an aspect ratio over %g:1 (e.g. %s at %.1f:1): the centred square crop keeps "
                    "only a part of each; they are listed in manifest.json under extreme_aspect",
                    len(wide), data.max_aspect, wide[0][0], wide[0][1])
    return {"threshold": data.max_aspect, "count": len(wide),
            "examples": [{"path": p, "aspect": round(a, 2)} for p, a in wide[:10]]}


def _decode_all(jobs: list, workers: int) -> Iterator[tuple[bytes | None, str | None]]:
    if workers <= 1 or len(jobs) < 64:
        yield from map(_process, jobs)
        return
    # fork, as torch's DataLoader does: works from any __main__ (stdin, notebooks, Ray
    # workers); the children only decode images and never touch the parent's locks.
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as ex:
        yield from ex.map(_process, jobs, chunksize=max(1, min(256, len(jobs) // (workers * 8))))


def die_with_parent(parent: int) -> None:
    """In a decode worker: end when the process that started it ends, even by ``kill -9`` (left alone, a
    worker of a killed ``ganforge shard`` waited forever, holding its memory). Linux: the kernel's parent-death
    signal; elsewhere: a thread that watches the parent."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


class _SplitWriter:
    """Rolls tar shards of ``shard_size`` samples for one split, with fixed tar metadata."""

    def __init__(self, folder: Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._n = 0
        self.count = 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._n == self.shard_size:
            self._close()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.shards.append({"file": name, "count": 0})
            self._writer = wds.TarWriter(
                str(self.folder / name), user="ganforge", group="ganforge", mode=0o444, mtime=0, encoder=False
            )
            self._n = 0
        self._writer.write(sample)
        self._n += 1
        self.count += 1
        self.shards[-1]["count"] += 1

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            last = self.shards[-1]
            last["size"] = (self.folder / last["file"]).stat().st_size
            last["sha256"] = sha256_file(self.folder / last["file"])

    def finish(self) -> dict:
        self._close()
        return {"count": sum(s["count"] for s in self.shards), "shards": self.shards}


def write_manifest(folder: Path, manifest: dict) -> None:
    """``manifest.json`` of a shard set (images or tokens), sorted keys: byte-stable for DVC."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def shard(source: str, out: str | Path, data: DataParams, *, progress: bool = True) -> dict:
    """Shard ``source`` into ``out``; returns the manifest. See the module docstring. A two-domain source
    (``data.source_b`` set, or a folder in CycleGAN's trainA/ trainB/ layout) goes to :func:`shard_domains`."""
    out = Path(out)
    if data.source_b or is_domain_layout(source):
        return shard_domains(source, data.source_b, out, data, progress=progress)
    listing = list_source(source, download=data.download, torchvision_root=data.torchvision_root,
                          follow_links=data.follow_links)
    cands = listing.candidates
    skipped = list(listing.skipped)
    if not cands:
        raise ShardError(f"no usable image in {source!r}: {len(skipped)} file(s) skipped, e.g. {skipped[:3]}")

    # Seeded permutation of the sorted candidates; the first ceil(f*N) go to val.
    order = np.random.default_rng(data.seed).permutation(len(cands))
    n_val = math.ceil(data.val_fraction * len(cands)) if data.val_fraction > 0 else 0
    if n_val >= len(cands):
        n_val = len(cands) - 1
    jobs = [(cands[i], data.resolution, data.image_format, _limits(data)) for i in order]
    per_class = data.labelled_per_class
    if per_class and not listing.classes:
        raise ShardError("--labelled-per-class needs a labelled source (class subfolders, digits, synthetic:shapes): "
                         f"{source!r} has no classes")

    with staged_dir(out) as tmp:
        writers = {s: _SplitWriter(tmp, s, data.shard_size) for s in SPLITS + ((LABELLED,) if per_class else ())}
        ext = data.image_format
        log.info("sharding %d candidates from %s at %dx%d (%s) with %d workers", len(jobs), source, data.resolution, data.resolution, ext, data.workers)
        labelled_keys: dict[int, list[str]] = {}
        results = _decode_all(jobs, data.workers)
        bar = tqdm(results, total=len(jobs), desc="shard", unit="img", disable=not progress, mininterval=0.5)
        wide: list[tuple[str, float]] = []
        for pos, (payload, reason, aspect) in enumerate(bar):
            cand = jobs[pos][0]
            if payload is None:
                skipped.append({"path": cand.ref, "reason": reason})
                continue
            if aspect > data.max_aspect:
                wide.append((cand.ref, aspect))
            split = "val" if pos < n_val else "train"
            if split == "train" and data.max_train_images and writers["train"].count >= data.max_train_images:
                continue  # data.max_train_images: a smaller train split, the same val split
            sample = {"__key__": f"s{int(order[pos]):08d}", ext: payload, "json": json.dumps({"source": cand.ref}).encode()}
            if cand.label is not None:
                sample["cls"] = str(cand.label).encode()
            writers[split].write(sample)
            # the labelled subset: the first N train images of each class in the seeded order (deterministic,
            # class-balanced); a copy, the train split keeps every image
            keys = labelled_keys.setdefault(cand.label, [])
            if per_class and split == "train" and len(keys) < per_class:
                keys.append(sample["__key__"])
                writers[LABELLED].write(sample)
        splits = {s: w.finish() for s, w in writers.items()}
        count = sum(splits[s]["count"] for s in SPLITS)  # the labelled split holds copies
        if count == 0:
            raise ShardError(
                f"no usable image in {source!r}: all {len(skipped)} file(s) were skipped; first reasons: "
                + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
            )
        if splits["train"]["count"] == 0:
            raise ShardError(f"only {count} usable image(s) in {source!r}: nothing left for the train split")
        short = {c: len(labelled_keys.get(i, [])) for i, c in enumerate(listing.classes)
                 if per_class and len(labelled_keys.get(i, [])) < per_class}
        if short:
            raise ShardError(f"--labelled-per-class {per_class}: the train split has fewer images of class(es) "
                             f"{short} (images per class)")
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": source,
            "count": count,
            "skipped": sorted(skipped, key=lambda s: s["path"]),
            "resolution": data.resolution,
            "channels": 3,
            "image_format": ext,
            "resize_filter": RESIZE_FILTER,
            "classes": listing.classes,
            "splits": splits,
            "params": data.model_dump(mode="json", exclude=RUN_ONLY_PARAMS),
            "extreme_aspect": _aspect_report(wide, data),
            **({"labelled": {"per_class": per_class, "split": LABELLED,
                             "keys": sorted(k for v in labelled_keys.values() for k in v)}} if per_class else {}),
        }
        write_manifest(tmp, manifest)
    log.info("wrote %d images (%s) to %s; skipped %d", count, {s: v["count"] for s, v in splits.items()}, out, len(skipped))
    return manifest


# ----------------------------------------------------------------------------- two domains (unpaired translation)

DOMAINS = ("A", "B")
TWO_DOMAIN = "two-domain"  # manifest["kind"] of a two-domain shard set


def domain_split(split: str, domain: str) -> str:
    """The shard split of one domain, by CycleGAN's names: ("train" | "val"/"test") x ("A" | "B") -> trainA, ..."""
    return ("train" if split == "train" else "test") + domain


def is_domain_layout(source: str) -> bool:
    """A folder in pytorch-CycleGAN-and-pix2pix's layout: trainA/ and trainB/ (and usually testA/ testB/)."""
    p = Path(source)
    return "://" not in source and p.is_dir() and (p / "trainA").is_dir() and (p / "trainB").is_dir()


def is_two_domain(manifest: dict) -> bool:
    return manifest.get("kind") == TWO_DOMAIN


def shard_domains(source: str, source_b: str | None, out: str | Path, data: DataParams, *,
                  progress: bool = True) -> dict:
    """Shard two unpaired image domains into one shard set with the splits trainA, testA, trainB and testB.

    ``source`` is a folder in CycleGAN's layout (``trainA/ trainB/ testA/ testB/``; a missing test folder is
    held out of its train folder by ``data.val_fraction``) when ``source_b`` is None; otherwise ``source`` is
    domain A and ``source_b`` domain B, any single-domain source each, split by ``data.val_fraction``. The
    manifest records per-domain sources, counts and skipped files, and every shard's sha256."""
    out = Path(out)
    if data.labelled_per_class:
        raise ShardError("--labelled-per-class needs a labelled source; two-domain (unpaired) data has no classes")
    if source_b is not None and is_domain_layout(source):
        raise ShardError(f"{source} is a folder in CycleGAN's layout (trainA/ trainB/): it holds both domains, "
                         f"so leave out --source-b ({source_b})")
    layout = source_b is None  # skipped files and origins are then named with their folder: trainB/x.png
    if layout:
        root = Path(source)
        plan = {d: {part: str(root / f"{part}{d}") for part in ("train", "test") if (root / f"{part}{d}").is_dir()}
                for d in DOMAINS}
    else:
        plan = {"A": {"train": source}, "B": {"train": source_b}}
    jobs: list[tuple[Candidate, int, str]] = []
    where: list[tuple[str, str]] = []  # (domain, split) of each job
    domains: dict[str, dict] = {}
    for i, (d, parts) in enumerate(plan.items()):
        listed = {}
        for part, src in parts.items():
            try:
                listing = list_source(src, download=data.download, torchvision_root=data.torchvision_root,
                                      follow_links=data.follow_links)
            except SourceError as e:
                raise ShardError(f"domain {d} ({src}): {e}") from None
            if not listing.candidates:
                raise ShardError(f"domain {d} ({src}) holds no image file ({len(listing.skipped)} other file(s))")
            listed[part] = listing
        train = listed["train"].candidates
        order = np.random.default_rng([data.seed, i]).permutation(len(train))
        if "test" in listed:
            test = listed["test"].candidates
            test_order = np.random.default_rng([data.seed, i, 1]).permutation(len(test))
            split_of = [("train", "train", train[k]) for k in order] + [("test", "test", test[k]) for k in test_order]
        else:
            n_test = min(math.ceil(data.val_fraction * len(train)), len(train) - 1) if data.val_fraction > 0 else 0
            split_of = [("test" if pos < n_test else "train", "train", train[k]) for pos, k in enumerate(order)]
        kept = 0
        for part, folder, cand in split_of:  # the split it goes to, and the folder it came from
            if part == "train" and data.max_train_images:
                if kept >= data.max_train_images:
                    continue
                kept += 1
            jobs.append((Candidate(f"{folder}{d}/{cand.ref}" if layout else cand.ref, None, cand.kind,
                                   cand.locator), data.resolution, data.image_format, _limits(data)))
            where.append((d, part))
        domains[d] = {"source": parts if layout else parts["train"],
                      "skipped": [dict(s, path=f"{d}:{f'{part}{d}/' if layout else ''}{s['path']}")
                                  for part, lst in listed.items() for s in lst.skipped]}
    with staged_dir(out) as tmp:
        names = [domain_split(part, d) for d in DOMAINS for part in ("train", "test")]
        writers = {n: _SplitWriter(tmp, n, data.shard_size) for n in names}
        log.info("sharding two domains (%s) at %dx%d (%s) with %d workers",
                 ", ".join(f"{d}: {sum(1 for w in where if w[0] == d)} candidates" for d in DOMAINS),
                 data.resolution, data.resolution, data.image_format, data.workers)
        bar = tqdm(_decode_all(jobs, data.workers), total=len(jobs), desc="shard", unit="img", disable=not progress,
                   mininterval=0.5)
        wide: list[tuple[str, float]] = []
        for pos, (payload, reason, aspect) in enumerate(bar):
            (d, part), cand = where[pos], jobs[pos][0]
            if payload is None:
                domains[d]["skipped"].append({"path": f"{d}:{cand.ref}", "reason": reason})
                continue
            if aspect > data.max_aspect:
                wide.append((f"{d}:{cand.ref}", aspect))
            w = writers[domain_split(part, d)]
            w.write({"__key__": f"{w.split.lower()}{w.count:08d}", data.image_format: payload,
                     "json": json.dumps({"source": cand.ref, "domain": d}).encode()})
        splits = {n: w.finish() for n, w in writers.items()}
        for d in DOMAINS:
            train, test = splits[f"train{d}"]["count"], splits[f"test{d}"]["count"]
            if train == 0:
                first = "; ".join(f"{s['path']}: {s['reason']}" for s in domains[d]["skipped"][:3])
                raise ShardError(f"domain {d} has no usable train image ({len(domains[d]['skipped'])} skipped: {first})")
            domains[d].update(count=train + test, splits={"train": train, "test": test},
                              skipped=sorted(domains[d]["skipped"], key=lambda s: s["path"]))
        manifest = {
            "format": MANIFEST_FORMAT, "kind": TWO_DOMAIN, "source": source, "source_b": source_b,
            "count": sum(v["count"] for v in domains.values()),
            "skipped": sorted((s for v in domains.values() for s in v["skipped"]), key=lambda s: s["path"]),
            "resolution": data.resolution, "channels": 3, "image_format": data.image_format,
            "resize_filter": RESIZE_FILTER, "classes": [], "domains": domains, "splits": splits,
            "params": data.model_dump(mode="json", exclude=RUN_ONLY_PARAMS),
            "extreme_aspect": _aspect_report(wide, data),
        }
        write_manifest(tmp, manifest)
    log.info("wrote two domains to %s: %s; skipped %d", out, {n: v["count"] for n, v in splits.items()},
             len(manifest["skipped"]))
    return manifest


def read_manifest(shards: str | Path) -> dict:
    """The manifest of a shard folder, checked for the keys readers need; a damaged one names its file."""
    from ganforge.tasks.storage import exists, join, read_text

    path = join(shards, MANIFEST)
    if not exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {shards}: run `ganforge shard` first")
    try:
        m = json.loads(read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}): regenerate the shards with `ganforge shard`") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ShardError(f"{path} has format {got!r}, expected {MANIFEST_FORMAT!r}")
    missing = [k for k in ("resolution", "splits") if k not in m]
    bad = [f"splits.{name}" for name, e in (m.get("splits") or {}).items()
           if not isinstance(e, dict) or "count" not in e or
           any(not isinstance(x, dict) or "file" not in x or "count" not in x for x in e.get("shards", [None]))]
    if missing or bad:
        raise ShardError(f"{path} lacks {', '.join(missing + bad)}: regenerate the shards with `ganforge shard`")
    return m


CHEAP_SHA256_BYTES = 256 << 20  # a full sha256 check runs by default up to this many bytes of shards


def _tar_sample_count(path: Path) -> int:
    """Samples (distinct keys) in a tar, from its headers; a truncated tar raises."""
    import tarfile

    keys = []
    size = path.stat().st_size
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                key = m.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"member {m.name} ends past the end of the file")
    return len(keys)


def verify_shards(shards: str | Path, *, full: bool | None = None) -> dict:
    """Check every shard of a local shard folder against its manifest before anything reads it: present,
    of the recorded size, holding the recorded number of samples, and (``full``; by default when the set is
    small) of the recorded sha256. Remote shards are checked against their sha256 when fetched."""
    import tarfile

    from ganforge.tasks.storage import is_remote

    m = read_manifest(shards)
    if is_remote(shards):
        return m
    entries = [(split, e) for split, entry in m["splits"].items() for e in entry["shards"]]
    total = sum(int(e.get("size") or 0) for _, e in entries)
    if full is None:
        full = total <= CHEAP_SHA256_BYTES
    regen = f"regenerate the shards: `ganforge shard --source {m.get('source', 'SOURCE')} --out {shards}`"
    for split, e in entries:
        path = Path(shards) / e["file"]
        if not path.exists():
            raise ShardError(f"{path} is missing (split {split}); {regen}")
        size = path.stat().st_size
        if e.get("size") is not None and size != e["size"]:
            raise ShardError(f"{path} has {size} bytes, the manifest records {e['size']} (truncated or replaced); {regen}")
        try:
            n = _tar_sample_count(path)
        except (tarfile.TarError, OSError) as err:
            raise ShardError(f"{path} is not a readable tar ({err}); {regen}") from None
        if n != e["count"]:
            raise ShardError(f"{path} holds {n} samples, the manifest lists {e['count']}; {regen}")
        if full and e.get("sha256") and sha256_file(path) != e["sha256"]:
            raise ShardError(f"{path} does not match its sha256 in the manifest (damaged or replaced); {regen}")
    return m


def manifest_hash(shards: str | Path) -> str:
    """Content hash of a shard set (the manifest lists every shard's sha256)."""
    from ganforge.tasks.storage import is_remote, join, read_text

    if is_remote(shards):
        return hashlib.sha256(read_text(join(shards, MANIFEST)).encode()).hexdigest()
    return sha256_file(Path(shards) / MANIFEST)


__all__ = ["shard", "ShardError", "SourceError", "read_manifest", "manifest_hash", "verify_shards"]

