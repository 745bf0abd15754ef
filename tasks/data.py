"""Reading shards: an endless, rank-split training stream and an exact-once evaluation reader.

Training: shards are split over (Ray Train rank x DataLoader worker) parts.
With at least as many shards as parts each part reads its own shards; with
fewer shards (one shard, tiny data) every part reads all shards and keeps the
samples whose global index falls in its part, so no rank is ever starved. The
stream is endless (re-shuffled every pass), so every rank yields the same
number of batches: the training loop, not the data, decides when a stage ends.

Evaluation: every sample of a split exactly once, in manifest order, optionally
one contiguous slice of it (for parallel feature extraction).
"""

from __future__ import annotations

import io
import mmap
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ganforge.tasks.errors import ShardError
from ganforge.tasks.shard import read_manifest
from ganforge.tasks.storage import is_remote, join, local_copy


def decode_sample(sample: dict, npy_header: bytes | None = None) -> tuple[np.ndarray, int]:
    """A raw tar sample -> (uint8 HxWx3, label or -1).

    ``npy_header``: the exact .npy header every sample of this shard set carries
    (see :func:`npy_header_for`); matching samples are viewed without parsing.
    """
    if "npy" in sample:
        raw = sample["npy"]
        if npy_header is not None and raw[: len(npy_header)] == npy_header:
            arr = np.frombuffer(raw, np.uint8, offset=len(npy_header)).reshape(_HEADER_SHAPES[npy_header])
        else:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
    elif "png" in sample:
        arr = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    else:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image (keys: {sorted(sample)})")
    label = int(sample["cls"]) if "cls" in sample else -1
    return arr, label


_HEADER_SHAPES: dict[bytes, tuple[int, ...]] = {}


def npy_header_for(resolution: int) -> bytes:
    """The .npy header that ``np.save`` writes for a uint8 RxRx3 array."""
    shape = (resolution, resolution, 3)
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.uint8), allow_pickle=False)
    header = buf.getvalue()[: -int(np.prod(shape))]
    _HEADER_SHAPES[header] = shape
    return header


_ZERO_BLOCK = bytes(512)


def shard_url(shards: str | Path, entry: dict) -> str:
    """Where one shard of a manifest lives; remote shards carry their sha256 for the local cache."""
    url = join(shards, entry["file"])
    return f"{url}#sha256={entry['sha256']}" if is_remote(url) and entry.get("sha256") else url


def _iter_tar(url: str, expect: int | None = None) -> Iterator[dict]:
    """Samples of one tar shard (a local path, or a remote URL copied once into the local cache); with
    ``expect`` (the manifest's count) a shard holding another number of samples raises ShardError.

    Our shards are plain USTAR files of regular members named ``<key>.<ext>``;
    those are parsed straight from a memory map (tarfile's per-member Python
    overhead dominated the stream). Anything else is handed to webdataset.
    """
    if is_remote(url):
        base, _, sha = url.partition("#sha256=")
        url = local_copy(base, sha or None)
    with open(url, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos, end = 0, len(data)
        samples: list[dict] = []
        cur: dict | None = None
        while pos + 512 <= end:
            hdr = data[pos : pos + 512]
            if hdr == _ZERO_BLOCK:
                break
            name = hdr[:100].split(b"\0", 1)[0].decode()
            if hdr[156:157] not in (b"0", b"\0") or hdr[345:346] != b"\0" or "/" in name or "." not in name:
                break  # not one of ours: fall back below
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if pos + 512 + size > end:
                raise ShardError(f"{url}: truncated inside member {name} (regenerate the shards with `ganforge shard`)")
            key, ext = name.split(".", 1)
            if cur is None or cur["__key__"] != key:
                cur = {"__key__": key}
                samples.append(cur)
            cur[ext] = data[pos + 512 : pos + 512 + size]
            pos += 512 + (size + 511) // 512 * 512
        else:
            pos = end
        fast = pos + 512 > end or data[pos : pos + 512] == _ZERO_BLOCK
    n = len(samples)
    if fast and expect is not None and n != expect:
        raise ShardError(f"{url} holds {n} samples, the manifest lists {expect} (truncated or replaced): "
                         f"regenerate the shards with `ganforge shard`")
    if fast:
        yield from samples
        return
    n = 0
    for sample in wds.tariterators.tarfile_samples([{"url": url}]):
        n += 1
        yield sample
    if expect is not None and n != expect:
        raise ShardError(f"{url} holds {n} samples, the manifest lists {expect} (truncated or replaced): "
                         f"regenerate the shards with `ganforge shard`")


def to_model_input(imgs: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [-1, 1], box-downsampled to ``resolution`` when stored larger."""
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    if t.shape[-1] != resolution:
        t = torch.nn.functional.avg_pool2d(t, t.shape[-1] // resolution)
    return t.div_(127.5).sub_(1.0).contiguous()


class TrainStream(IterableDataset):
    """Endless batches ``(images[B,3,r,r] in [-1,1], labels[B])`` for one rank."""

    def __init__(
        self,
        shards: str | Path,
        resolution: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        xflip: bool = False,
        shuffle_buffer: int = 512,
        split: str = "train",
        start_batch: int = 0,
        load_size: int | None = None,
    ):
        m = read_manifest(shards)
        self._configure(m, shards, resolution)
        if split not in m["splits"] or m["splits"][split]["count"] == 0:
            raise ValueError(f"split {split!r} of {shards} is empty")
        self.shards = [(shard_url(shards, s), s["count"]) for s in m["splits"][split]["shards"]]
        self.resolution, self.batch_size = resolution, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.xflip, self.shuffle_buffer = xflip and self.flippable, shuffle_buffer
        self.start_batch = start_batch  # batches of this rank already consumed (exact resume)
        # resize-then-random-crop (pix2pix/CycleGAN's load_size -> crop_size): a random resolution^2 window of the
        # image resized to load_size^2; None or == resolution: no crop
        self.load_size = load_size if load_size and load_size != resolution else None
        if self.load_size is not None and self.load_size < resolution:
            raise ValueError(f"load_size {load_size} is smaller than the crop ({resolution}px)")

    flippable = True

    def _configure(self, m: dict, shards, resolution: int) -> None:
        """Checks and fields that depend on what the shards hold (images here)."""
        if m.get("kind") == "tokens":
            raise ValueError(f"{shards} holds code-index tokens, not images")
        if resolution > m["resolution"]:
            raise ValueError(f"requested {resolution}px but the shards in {shards} are {m['resolution']}px")
        self.stored_resolution = m["resolution"]
        self._npy_header = npy_header_for(m["resolution"])

    def _part(self) -> tuple[int, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw, wid

    def samples(self) -> Iterator[tuple[np.ndarray, int]]:
        """Endless decoded ``(uint8 HxWx3, label)`` of this part, shuffled."""
        return (decode_sample(raw, self._npy_header) for raw in self.raw_samples())

    def raw_samples(self) -> Iterator[dict]:
        part, parts, _ = self._part()
        rng = random.Random(f"{self.seed}-{part}")
        offsets = np.cumsum([0] + [c for _, c in self.shards])
        if len(self.shards) >= parts:
            mine = [(i, u) for i, (u, _) in enumerate(self.shards)][part::parts]
            keep = None
        else:
            mine = [(i, u) for i, (u, _) in enumerate(self.shards)]
            keep = (part, parts)
        if keep is not None and offsets[-1] < parts:
            raise ValueError(f"{offsets[-1]} samples cannot feed {parts} readers (ranks x loader workers)")
        buf: list[dict] = []
        while True:
            rng.shuffle(mine)
            for shard_idx, url in mine:
                for j, raw in enumerate(_iter_tar(url, self.shards[shard_idx][1])):
                    if keep is not None and (offsets[shard_idx] + j) % keep[1] != keep[0]:
                        continue
                    buf.append(raw)
                    if len(buf) >= self.shuffle_buffer:
                        k = rng.randrange(len(buf))
                        buf[k], buf[-1] = buf[-1], buf[k]
                        yield buf.pop()
            # drain nothing: the buffer carries over into the next pass

    fields = ("image", "label")  # the batch mapping's keys, in the order of the yielded tuple

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        part, _, wid = self._part()
        info = get_worker_info()
        nw = info.num_workers if info is not None else 1
        # A DataLoader hands out batches round-robin over its workers: this worker's
        # share of the already-consumed batches is skipped undecoded.
        skip = len(range(wid, self.start_batch, nw))
        imgs, labels = [], []
        batch = 0
        for raw in self.raw_samples():
            if batch >= skip:
                arr, label = self._decode(raw)
                imgs.append(arr)
                labels.append(label)
            else:
                imgs.append(None)
            if len(imgs) == self.batch_size:
                if batch >= skip:
                    yield self._collate(imgs, labels, np.random.default_rng([self.seed, part, batch]))
                batch += 1
                imgs, labels = [], []

    def _decode(self, raw: dict) -> tuple[np.ndarray, int]:
        return decode_sample(raw, self._npy_header)

    def _collate(self, imgs: list[np.ndarray], labels: list[int], flip_rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-batch conversion: uint8 NHWC -> (box-downsampled) float NCHW in [-1, 1]."""
        x = np.stack(imgs)
        if self.xflip:
            flip = flip_rng.random(len(imgs)) < 0.5
            x[flip] = x[flip, :, ::-1]
        if self.load_size is None:
            return to_model_input(x, self.resolution), torch.tensor(labels, dtype=torch.long)
        t = torch.nn.functional.interpolate(to_model_input(x, x.shape[1]), size=(self.load_size, self.load_size),
                                            mode="bicubic", align_corners=False, antialias=True).clamp_(-1, 1)
        r, span = self.resolution, self.load_size - self.resolution + 1
        offsets = flip_rng.integers(0, span, size=(len(imgs), 2))
        crops = torch.stack([t[i, :, y : y + r, x0 : x0 + r] for i, (y, x0) in enumerate(offsets.tolist())])
        return crops.contiguous(), torch.tensor(labels, dtype=torch.long)


class TokenStream(TrainStream):
    """Endless batches ``(codes[B,h,w] int64, labels[B])`` of a token shard set (VQ-GAN's prepare stage, tasks/prepare.py)."""

    flippable = False  # flipping a code grid is not flipping the image
    fields = ("tokens", "label")

    def _configure(self, m: dict, shards, resolution: int) -> None:
        if m.get("kind") != "tokens":
            raise ValueError(f"{shards} holds images, not code-index tokens (run the tokens stage first)")
        self.grid = tuple(m["grid"])

    def _decode(self, raw: dict) -> tuple[np.ndarray, int]:
        arr = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        if arr.shape != self.grid:
            raise ValueError(f"token sample {raw.get('__key__')!r} has shape {arr.shape}, expected {self.grid}")
        return arr, int(raw["cls"]) if "cls" in raw else -1

    def _collate(self, imgs, labels, flip_rng):
        return torch.from_numpy(np.stack(imgs).astype(np.int64)), torch.tensor(labels, dtype=torch.long)


LABELLED_SPLIT = "labelled"


class LabelledMixStream(IterableDataset):
    """Endless batches for semi-supervised training: every batch holds ``labelled`` images of the shards'
    ``labelled`` split (``ganforge shard --labelled-per-class N``) followed by ``batch_size - labelled`` images
    of the train split whose labels are withheld (-1), so no rank ever gets a batch without labels. Both parts
    are rank-split and resume-exact like :class:`TrainStream`."""

    fields = ("image", "label")

    def __init__(self, shards: str | Path, resolution: int, batch_size: int, *, labelled: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, xflip: bool = False, start_batch: int = 0):
        if not 0 < labelled < batch_size:
            raise ValueError(f"a mixed batch of {batch_size} needs 1..{batch_size - 1} labelled images, got {labelled}")
        m = read_manifest(shards)
        if not (m["splits"].get(LABELLED_SPLIT) or {}).get("count"):
            raise ValueError(f"{shards} has no labelled subset: shard with `ganforge shard --labelled-per-class N`")
        kw = dict(rank=rank, world_size=world_size, xflip=xflip, start_batch=start_batch)
        self.labelled = TrainStream(shards, resolution, labelled, split=LABELLED_SPLIT, seed=seed * 7919 + 1, **kw)
        self.unlabelled = TrainStream(shards, resolution, batch_size - labelled, seed=seed, **kw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (xl, yl), (xu, yu) in zip(self.labelled, self.unlabelled):
            yield torch.cat([xl, xu]), torch.cat([yl, torch.full_like(yu, -1)])


class DomainPairStream(IterableDataset):
    """Endless unpaired batches ``(images of domain A, images of domain B)`` of a two-domain shard set (trainA,
    trainB): each domain is its own rank-split stream with its own shuffle, so the pairs carry no correspondence;
    resize-then-random-crop (``load_size``) and flips as in pytorch-CycleGAN-and-pix2pix. Resume-exact like
    :class:`TrainStream`."""

    fields = ("image_a", "image_b")

    def __init__(self, shards: str | Path, resolution: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, xflip: bool = False, start_batch: int = 0, load_size: int | None = None):
        from ganforge.tasks.shard import is_two_domain

        m = read_manifest(shards)
        if not is_two_domain(m):
            raise ValueError(f"{shards} holds one image domain; unpaired translation needs two: shard with "
                             f"`ganforge shard --source A --source-b B` or a folder with trainA/ trainB/")
        kw = dict(rank=rank, world_size=world_size, xflip=xflip, start_batch=start_batch, load_size=load_size)
        self.a = TrainStream(shards, resolution, batch_size, split="trainA", seed=seed * 7919 + 1, **kw)
        self.b = TrainStream(shards, resolution, batch_size, split="trainB", seed=seed * 7919 + 2, **kw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (xa, _), (xb, _) in zip(self.a, self.b):
            yield xa, xb


# ----------------------------------------------------------------------------- streams by name

# A family names the stream each training stage reads (GANFamily.data_stream); the loop looks it up here.
# A builder takes (shards, stage, per-rank batch size, rank/world/seed/xflip/start_batch keywords).
STREAMS: dict[str, Callable[..., IterableDataset]] = {}


def register_stream(name: str):
    """Register a stream builder under ``name`` (a new kind of training data: IC-GAN's instance neighbours...)."""
    def deco(builder: Callable[..., IterableDataset]) -> Callable[..., IterableDataset]:
        STREAMS[name] = builder
        return builder
    return deco


def make_stream(name: str, shards: str | Path, stage, batch_size: int, **kw) -> IterableDataset:
    """The stream ``name`` over ``shards`` for ``stage`` (a StageSpec), ``batch_size`` images per rank."""
    if name not in STREAMS:
        raise ValueError(f"stage {stage.name} reads data stream {name!r}, which is not registered; "
                         f"known: {', '.join(sorted(STREAMS))}")
    return STREAMS[name](shards, stage, batch_size, **kw)


@register_stream("images")
def _images(shards, stage, batch_size, **kw):
    return TrainStream(shards, stage.resolution, batch_size, **kw)


@register_stream("tokens")
def _tokens(shards, stage, batch_size, **kw):
    return TokenStream(shards, stage.resolution, batch_size, **kw)


@register_stream("labelled")
def _labelled(shards, stage, batch_size, **kw):
    """Semi-supervised: ``stage.info["labelled_fraction"]`` of every batch from the labelled split."""
    labelled = min(batch_size - 1, max(1, round(batch_size * stage.info["labelled_fraction"])))
    return LabelledMixStream(shards, stage.resolution, batch_size, labelled=labelled, **kw)


@register_stream("two-domain")
def _two_domain(shards, stage, batch_size, **kw):
    """Unpaired translation: (A, B) batches, resize-then-crop to ``stage.info["load_size"]``."""
    return DomainPairStream(shards, stage.resolution, batch_size, load_size=stage.info.get("load_size"), **kw)


def train_loader(stream: TrainStream, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless iterator over a stream's batches, with ``num_workers`` loader processes."""
    if num_workers == 0:
        return iter(stream)
    return iter(DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=True, prefetch_factor=4))


def _split(shards: str | Path, split: str) -> dict:
    """The manifest entry of one split (count and shards), or a clear error."""
    m = read_manifest(shards)
    if split not in m["splits"]:
        raise ValueError(f"split {split!r} not in {shards}; have {sorted(m['splits'])}")
    return m["splits"][split]


def split_count(shards: str | Path, split: str) -> int:
    return _split(shards, split)["count"]


def iter_split(
    shards: str | Path, split: str, batch_size: int, *, start: int = 0, stop: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Samples ``[start, stop)`` of a split in manifest order, as uint8 NxHxWx3 batches and labels."""
    entry = _split(shards, split)
    total = entry["count"]
    stop = total if stop is None else min(stop, total)
    imgs, labels = [], []
    pos = 0
    for s in entry["shards"]:
        if pos + s["count"] <= start:
            pos += s["count"]
            continue
        if pos >= stop:
            break
        for raw in _iter_tar(shard_url(shards, s), s["count"]):
            if start <= pos < stop:
                arr, label = decode_sample(raw)
                imgs.append(arr)
                labels.append(label)
                if len(imgs) == batch_size:
                    yield np.stack(imgs), np.asarray(labels)
                    imgs, labels = [], []
            pos += 1
    if imgs:
        yield np.stack(imgs), np.asarray(labels)
