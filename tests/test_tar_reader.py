"""The memory-mapped tar reader (tasks/data.py) reads our own shards and hands anything else to webdataset:
a tar with members it does not parse (a directory entry, a PAX header) gives exactly webdataset's samples."""

import io
import tarfile

import numpy as np
import webdataset as wds

from ganforge.tasks.data import _iter_tar, decode_sample


def _npy(v: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.full((4, 4, 3), v, np.uint8), allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _samples(it) -> list[tuple[str, int, int]]:
    out = []
    for s in it:
        arr, label = decode_sample(s)
        out.append((s["__key__"], int(arr[0, 0, 0]), label))
    return out


def test_own_shards_take_the_fast_path(tmp_path):
    path = tmp_path / "ours.tar"
    # as tasks/shard.py writes them (fixed mtime: a float mtime makes the writer add PAX headers)
    with wds.TarWriter(str(path), user="ganforge", group="ganforge", mode=0o444, mtime=0, encoder=False) as w:
        for i in range(5):
            w.write({"__key__": f"{i:06d}", "npy": _npy(i), "cls": str(i % 2).encode()})
    fast = list(_iter_tar(str(path)))
    assert all("__url__" not in s for s in fast)  # parsed by our reader (webdataset's samples carry __url__)
    assert _samples(fast) == [(f"{i:06d}", i, i % 2) for i in range(5)]


def test_foreign_tar_falls_back_to_webdataset(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("images")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)  # a directory member: not one of ours
        for i in range(3):
            _add(tf, f"images/{i:06d}.npy", _npy(10 + i))
            _add(tf, f"images/{i:06d}.cls", str(i).encode())
    raw = list(_iter_tar(str(path)))
    assert all("__url__" in s for s in raw)  # handed to webdataset
    ours = _samples(raw)
    ref = _samples(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    assert ours == ref and [v for _, v, _ in ours] == [10, 11, 12]
