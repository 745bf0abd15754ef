import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ganforge.tasks.data import decode_sample
from ganforge.tasks.params import DataParams
from ganforge.tasks.shard import ShardError, SourceError, read_manifest, shard
from ganforge.tasks.sources import to_rgb


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def make_messy_folder(root: Path) -> dict:
    """A real-world-like folder: two classes, mixed modes, sizes and extensions, and broken files."""
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    good = 0
    _save(rgb(40, 30), root / "cats/a_rgb.png"); good += 1
    _save(rgb(64, 64).convert("L"), root / "cats/b_gray.JPG", "JPEG"); good += 1
    _save(rgb(33, 50).convert("P"), root / "cats/c_palette.gif"); good += 1
    rgba = rgb(20, 20).convert("RGBA"); rgba.putalpha(128)
    _save(rgba, root / "cats/d_rgba.PNG", "PNG"); good += 1
    _save(rgb(24, 24).convert("CMYK"), root / "dogs/e_cmyk.jpg", "JPEG"); good += 1
    arr16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    _save(Image.fromarray(arr16), root / "dogs/f_16bit.png", "PNG"); good += 1
    _save(rgb(16, 48).convert("LA"), root / "dogs/g_la.png", "PNG"); good += 1
    _save(rgb(100, 80), root / "dogs/h_big.Jpeg", "JPEG"); good += 1
    # broken inputs
    buf = io.BytesIO(); rgb(64, 64).save(buf, "PNG")
    (root / "dogs/trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dogs/empty.jpg").write_bytes(b"")
    (root / "cats/notes.txt").write_text("not an image")
    (root / "cats/fake.png").write_bytes(b"this is not a png at all")
    return {"good": good, "bad": {"dogs/trunc.png", "dogs/empty.jpg", "cats/notes.txt", "cats/fake.png"}}


@pytest.fixture()
def messy(tmp_path):
    info = make_messy_folder(tmp_path / "src")
    return tmp_path / "src", info


def test_digits_manifest(digits_shards):
    m = read_manifest(digits_shards)
    assert m["count"] == 1797 and m["skipped"] == []
    assert m["splits"]["val"]["count"] == 180 and m["splits"]["train"]["count"] == 1617
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["resolution"] == 16 and "LANCZOS" in m["resize_filter"]
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert all(len(s["sha256"]) == 64 for s in m["splits"]["train"]["shards"])
    with tarfile.open(digits_shards / "train-000000.tar") as tf:
        names = tf.getnames()
        member = tf.getmember(names[0])
    keys = {n.split(".")[0] for n in names}
    assert all("." not in k for k in keys)
    assert member.mtime == 0 and member.uname == "ganforge"
    assert {n.split(".", 1)[1] for n in names} == {"npy", "cls", "json"}


def test_messy_folder_counts_reasons_and_determinism(messy, tmp_path):
    src, info = messy
    params = DataParams(resolution=16, shard_size=3, val_fraction=0.25, workers=1)
    m1 = shard(str(src), tmp_path / "o1", params, progress=False)
    assert m1["count"] == info["good"]
    skipped = {s["path"]: s["reason"] for s in m1["skipped"]}
    assert set(skipped) == info["bad"]
    assert "not an image" in skipped["cats/notes.txt"]
    assert skipped["dogs/empty.jpg"] == "zero bytes"
    assert skipped["dogs/trunc.png"] == "truncated image file"
    assert skipped["cats/fake.png"] == "not a decodable image (PIL: cannot identify image file)"
    assert m1["classes"] == ["cats", "dogs"]
    # a second run (with parallel workers) gives byte-identical output
    m2 = shard(str(src), tmp_path / "o2", params.model_copy(update={"workers": 2}), progress=False)
    files1 = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert files1 == sorted(p.name for p in (tmp_path / "o2").iterdir())
    for name in files1:  # manifest.json included: worker count and skip reasons leave no trace
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
    assert m1["splits"] == m2["splits"]
    # every stored image is 16x16 RGB uint8 with a label
    for s in m1["splits"]["train"]["shards"] + m1["splits"]["val"]["shards"]:
        with tarfile.open(tmp_path / "o1" / s["file"]) as tf:
            samples: dict = {}
            for mem in tf.getmembers():
                key, ext = mem.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(mem).read()
        for sample in samples.values():
            arr, label = decode_sample(sample)
            assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and label in (0, 1)


def test_png_format_and_zip_source(messy, tmp_path):
    src, info = messy
    z = tmp_path / "images.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    m = shard(str(z), tmp_path / "oz", DataParams(resolution=8, image_format="png", workers=1), progress=False)
    assert m["count"] == info["good"] and len(m["skipped"]) == len(info["bad"])
    assert m["classes"] == ["cats", "dogs"] and m["image_format"] == "png"


def test_mode_conversions():
    la = Image.new("LA", (2, 2), (0, 0))  # fully transparent black -> white background
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255]] * 2] * 2
    i16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [0, 255]
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 255, 255]]]


def test_empty_and_all_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        shard(str(tmp_path / "empty"), tmp_path / "o", DataParams(workers=1), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"garbage")
    (bad / "b.jpg").write_bytes(b"")
    with pytest.raises(ShardError, match="no usable image"):
        shard(str(bad), tmp_path / "o", DataParams(workers=1), progress=False)
    assert not (tmp_path / "o").exists()
    assert not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())
    with pytest.raises(SourceError, match="not found"):
        shard(str(tmp_path / "missing"), tmp_path / "o", DataParams(workers=1), progress=False)
    with pytest.raises(SourceError, match="unknown synthetic kind"):
        shard("synthetic:blobs", tmp_path / "o", DataParams(workers=1), progress=False)


def test_torchvision_offline_is_a_clear_error(tmp_path):
    params = DataParams(workers=1, torchvision_root=str(tmp_path / "tv"))
    with pytest.raises(SourceError, match="--download"):
        shard("torchvision:MNIST", tmp_path / "o", params, progress=False)
    with pytest.raises(SourceError, match="no dataset named"):
        shard("torchvision:NoSuchSet", tmp_path / "o", params, progress=False)


def test_interrupted_run_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    params = DataParams(resolution=8, shard_size=16, workers=1)
    shard("synthetic:shapes:64", out, params, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import ganforge.tasks.shard as mod

    calls = {"n": 0}
    real = mod._SplitWriter.write

    def dying_write(self, sample):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill")
        return real(self, sample)

    monkeypatch.setattr(mod._SplitWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        shard("synthetic:shapes:80", out, params, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_synthetic_is_deterministic_and_labelled(tmp_path):
    p = DataParams(resolution=8, workers=1, val_fraction=0.0)
    m1 = shard("synthetic:shapes:30", tmp_path / "a", p, progress=False)
    m2 = shard("synthetic:shapes:30", tmp_path / "b", p, progress=False)
    assert m1["splits"] == m2["splits"] and m1["count"] == 30 and m1["classes"] == ["circle", "square", "triangle"]
    assert m1["splits"]["val"]["count"] == 0
    json.dumps(m1)


def test_manifest_is_reproducible_with_bad_files(tmp_path):
    """Same folder with broken files, two runs (2 vs 1 workers, different output folders): byte-identical
    manifest.json, and skip reasons carry no object reprs or memory addresses."""
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for i in range(70):  # >= 64 jobs, so workers=2 really decodes in a process pool
        _save(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), src / f"good_{i:02d}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (src / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("not an image, just text")
    params = DataParams(resolution=8, shard_size=16, val_fraction=0.25)
    shard(str(src), tmp_path / "a", params.model_copy(update={"workers": 2}), progress=False)
    shard(str(src), tmp_path / "b" / "shards", params.model_copy(update={"workers": 1}), progress=False)
    raw = (tmp_path / "a" / "manifest.json").read_bytes()
    assert raw == (tmp_path / "b" / "shards" / "manifest.json").read_bytes()
    m = json.loads(raw)
    assert m["count"] == 70
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"trunc.png", "empty.png", "text.jpg"}
    assert all("0x" not in r and "<" not in r for r in reasons.values()), reasons
    assert reasons["trunc.png"] == "truncated image file"
    assert reasons["empty.png"] == "zero bytes"
    assert reasons["text.jpg"] == "not a decodable image (PIL: cannot identify image file)"
