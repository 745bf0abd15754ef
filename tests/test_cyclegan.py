"""CycleGAN and its two-domain data: the shard layouts (CycleGAN's trainA/ trainB/ testA/ testB/ folders, or two
sources), the unpaired stream, the history pool, the identity loss, the linear lr decay and exact resume, and the
refusals. The flow, `dvc repro`, the registered model and `ganforge translate` are in tests/test_pipeline.py
and tests/test_dvc.py; a killed worker in tests/test_train_ray.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ganforge.models.families.cyclegan import ImagePool, identity_losses, lr_factor
from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.data import DomainPairStream, iter_split
from ganforge.tasks.errors import ShardError
from ganforge.tasks.params import DataParams, ParamsError, TrainParams, load_params
from ganforge.tasks.shard import read_manifest, shard, verify_shards


def _images(folder: Path, n: int, color: tuple[int, int, int], size: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)) + n)
    for i in range(n):
        arr = np.clip(np.array(color) + rng.integers(-20, 20, (size, size + 4, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def test_cyclegan_folder_layout_is_sharded_per_domain(tmp_path):
    """A folder in pytorch-CycleGAN-and-pix2pix's layout with unequal domains: each domain's train and test
    folders become its own splits, a corrupt file is skipped and named with its domain, the manifest has
    per-domain counts and every shard's sha256, and the same input gives byte-identical shards."""
    src = tmp_path / "apple2orange"
    _images(src / "trainA", 9, (200, 30, 30))
    _images(src / "trainB", 5, (240, 150, 0))
    _images(src / "testA", 3, (200, 30, 30))
    _images(src / "testB", 2, (240, 150, 0))
    (src / "trainB" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    data = DataParams(resolution=8, shard_size=4, workers=1)
    m = shard(str(src), tmp_path / "s1", data, progress=False)
    assert m["kind"] == "two-domain" and m["classes"] == []
    assert {k: v["count"] for k, v in m["splits"].items()} == {"trainA": 9, "testA": 3, "trainB": 5, "testB": 2}
    assert m["domains"]["A"]["splits"] == {"train": 9, "test": 3} and m["domains"]["B"]["count"] == 7
    assert [s["path"] for s in m["domains"]["B"]["skipped"]] == ["B:trainB/broken.png"]
    assert all(len(e["sha256"]) == 64 for sp in m["splits"].values() for e in sp["shards"])
    assert verify_shards(tmp_path / "s1", full=True) == read_manifest(tmp_path / "s1")
    imgs, _ = next(iter_split(tmp_path / "s1", "testB", 8))
    assert imgs.shape == (2, 8, 8, 3) and imgs[..., 1].mean() > 100  # orange, not red
    shard(str(src), tmp_path / "s2", data, progress=False)
    for f in sorted((tmp_path / "s1").iterdir()):
        assert f.read_bytes() == (tmp_path / "s2" / f.name).read_bytes(), f.name
    with pytest.raises(ShardError, match="holds both domains, so leave out --source-b"):
        shard(str(src), tmp_path / "s3", DataParams(source_b=str(src / "trainB"), resolution=8, workers=1),
              progress=False)


def test_two_sources_split_by_val_fraction_and_empty_domains_are_named(tmp_path):
    """--source A --source-b B: each domain is split by data.val_fraction on its own; a domain with no images
    (an empty folder, or only unreadable files) is one clear error naming it, and nothing is written."""
    _images(tmp_path / "a", 10, (0, 0, 200))
    _images(tmp_path / "b", 4, (0, 200, 0))
    m = shard(str(tmp_path / "a"), tmp_path / "s", DataParams(source_b=str(tmp_path / "b"), resolution=8, workers=1,
                                                              val_fraction=0.25), progress=False)
    assert {k: v["count"] for k, v in m["splits"].items()} == {"trainA": 7, "testA": 3, "trainB": 3, "testB": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"^domain B \(.*empty\): source folder .* is empty"):
        shard(str(tmp_path / "a"), tmp_path / "t", DataParams(source_b=str(tmp_path / "empty"), resolution=8,
                                                              workers=1), progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ShardError, match="domain B has no usable train image"):
        shard(str(tmp_path / "a"), tmp_path / "t", DataParams(source_b=str(tmp_path / "junk"), resolution=8,
                                                              workers=1), progress=False)
    assert not (tmp_path / "t").exists()


def test_shard_cli_two_domains_and_its_errors(tmp_path, monkeypatch, capsys):
    from ganforge.flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["-q", "shard", "--source", "photo:china:12", "--source-b", "photo:flower:8", "--out", "p",
                 "--resolution", "8", "--workers", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["domains"] == {"A": {"train": 10, "test": 2}, "B": {"train": 7, "test": 1}}
    (tmp_path / "empty").mkdir()
    assert main(["-q", "shard", "--source", "photo:china:12", "--source-b", "empty", "--out", "q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "domain B (empty)" in err[0], err
    assert main(["-q", "shard", "--source", "photo:temple", "--out", "q"]) != 0
    assert "unknown photo 'temple'; allowed: china, flower" in capsys.readouterr().err


def test_families_refuse_the_other_kind_of_data(photo_shards, digits_shards):
    from ganforge.models.families import get_family

    p = load_params(None, {"train.family": "dcgan"})
    with pytest.raises(ValueError, match="hold two unpaired domains.*train.family: cyclegan"):
        get_family(p.train).check_data(read_manifest(photo_shards), photo_shards)
    c = load_params(None, {"train.family": "cyclegan", "train.resolution": 16, "train.cyclegan.d_layers": 2})
    with pytest.raises(ValueError, match="hold one: shard with `ganforge shard --source A --source-b B`"):
        get_family(c.train).check_data(read_manifest(digits_shards), digits_shards)
    with pytest.raises(ValueError, match="holds one image domain"):
        DomainPairStream(digits_shards, 16, 2)


def test_cyclegan_refuses_shards_without_test_images(tmp_path):
    """A domain of one image has nothing to hold out: refused before training, not after it, at evaluation."""
    from ganforge.models.families import get_family

    _images(tmp_path / "a", 6, (0, 0, 200))
    _images(tmp_path / "b", 1, (0, 200, 0))
    out = tmp_path / "s"
    shard(str(tmp_path / "a"), out, DataParams(source_b=str(tmp_path / "b"), resolution=8, workers=1), progress=False)
    c = load_params(None, {"train.family": "cyclegan", "train.resolution": 8, "train.cyclegan.d_layers": 1})
    with pytest.raises(ValueError, match=r"have \{'testA': 1, 'testB': 0\}: shard with data.val_fraction > 0"):
        get_family(c.train).check_data(read_manifest(out), out)


def test_cyclegan_params_are_checked():
    with pytest.raises(ParamsError, match=r"train.cyclegan.d_layers \(3\) leaves the PatchGAN no patches at "
                                          r"train.resolution 16px: use d_layers <= 2"):
        load_params(None, {"train.family": "cyclegan", "train.resolution": 16, "train.cyclegan.d_layers": 3})
    with pytest.raises(ParamsError, match=r"load_size \(12\) must be >= train.resolution \(16\)"):
        load_params(None, {"train.family": "cyclegan", "train.resolution": 16, "train.cyclegan.d_layers": 2,
                           "train.cyclegan.load_size": 12})
    with pytest.raises(ParamsError, match="resolution >= 8"):
        load_params(None, {"train.family": "cyclegan", "train.resolution": 4})
    with pytest.raises(ParamsError, match="norm: batch needs train.workers: 1"):
        load_params(None, {"train.family": "cyclegan", "train.cyclegan.norm": "batch", "train.workers": 2})


def test_the_stream_is_unpaired_cropped_and_resumes_exactly(photo_shards):
    """Batches hold domain A (the temple photo) and domain B (the flower) side by side, each domain's own stream;
    a stream started at batch k yields what the first one yielded from k on."""
    kw = dict(load_size=20, xflip=True, seed=3)
    s = DomainPairStream(photo_shards, 16, 4, **kw)
    batches = [b for _, b in zip(range(6), s)]
    a, b = batches[0]
    assert a.shape == b.shape == (4, 3, 16, 16) and -1 <= float(a.min()) and float(a.max()) <= 1
    # the flower photo (orange petals, dark green leaves) has far less blue than the temple's sky and walls
    blue_a = torch.cat([x for x, _ in batches])[:, 2].mean()
    blue_b = torch.cat([y for _, y in batches])[:, 2].mean()
    assert blue_b < blue_a - 0.3
    resumed = DomainPairStream(photo_shards, 16, 4, start_batch=3, **kw)
    for (x, y), (rx, ry) in zip(batches[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resize_then_random_crop(photo_shards):
    """load_size: each image is resized up and a window of the resolution is cut at a random place, so a fixed
    mark lands at different places; without load_size the image is only box-downsampled."""
    s = DomainPairStream(photo_shards, 16, 4, load_size=24).a
    x = np.zeros((16, 16, 16, 3), np.uint8)
    x[:, 7:9, 7:9] = 255  # a white mark at the centre of every image
    crops = s._collate(list(x), [0] * 16, np.random.default_rng(0))[0]
    assert crops.shape == (16, 3, 16, 16)
    centres = {tuple((c[0] == c[0].max()).nonzero().float().mean(0).round().int().tolist()) for c in crops}
    assert len(centres) > 4  # the mark (resized to ~3px at 24px) moved with the crop
    plain = DomainPairStream(photo_shards, 16, 4).a._collate(list(x), [0] * 16, np.random.default_rng(0))[0]
    assert all(torch.equal(p, plain[0]) for p in plain) and float(plain[0, 0, 7, 7]) == 1.0


def test_image_pool_mixes_stored_and_new_images_and_restores():
    """Until it is full the pool returns the new images; then each is returned with p = 0.5, or else a stored
    image that it replaces; its state restores the same future."""
    pool = ImagePool(4)
    g = torch.Generator().manual_seed(0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first, g), first) and len(pool.images) == 4
    new = torch.arange(100.0, 300.0).view(200, 1, 1, 1)
    out = pool.query(new, g)
    from_pool = (out != new).flatten()
    assert 0.4 < float(from_pool.float().mean()) < 0.6  # p = 0.5
    assert set(out[from_pool].flatten().tolist()) & set(range(4))  # the first images came back
    assert {float(t) for t in pool.images} <= set(range(100, 300))  # ... and were replaced by new ones
    state = pool.state()
    restored = ImagePool(4)
    restored.load(state)
    nxt = torch.arange(500.0, 540.0).view(40, 1, 1, 1)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(pool.query(nxt, g1), restored.query(nxt, g2))
    assert torch.equal(ImagePool(0).query(nxt, g1), nxt)
    # restored on the CPU, queried with fakes on another device: the stored images follow the fakes
    on_meta = ImagePool(4)
    on_meta.load(state)
    got = on_meta.query(torch.empty(3, 1, 1, 1, device="meta"), torch.Generator().manual_seed(1))
    assert got.device.type == "meta" and all(t.device.type == "meta" for t in on_meta.images)


def test_identity_loss_is_zero_for_identity_generators():
    a, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    assert [float(v) for v in identity_losses(torch.nn.Identity(), torch.nn.Identity(), a, b)] == [0.0, 0.0]
    # G: A -> B left alone, F: B -> A negating: only F's term, ||F(a) - a||, is non-zero
    f_term, g_term = identity_losses(torch.nn.Identity(), lambda x: -x, a, b)
    assert float(g_term) == 0.0 and float(f_term) == pytest.approx(float((2 * a).abs().mean()))


def test_lr_is_constant_then_decays_linearly_to_zero_at_the_last_step():
    f = [lr_factor(s, 10, 0.5) for s in range(10)]
    # constant through the first half (steps 0-4) and the decay's first step, then linear to 0 at step 9
    assert f[:6] == [1.0] * 6 and f[-1] == 0.0
    assert np.allclose(np.diff(f[5:]), -0.25)
    assert lr_factor(0, 1, 0.5) == 1.0  # a one-step stage has no room to decay
    assert [lr_factor(s, 4, 0.0) for s in range(4)] == pytest.approx([1, 2 / 3, 1 / 3, 0])


def _params(tmp_path, **section) -> TrainParams:
    cg = dict(ngf=4, ndf=4, n_blocks=1, d_layers=2, kimg=0.024, pool_size=3)
    cg.update(section)
    return TrainParams.model_validate(dict(family="cyclegan", resolution=16, batch_size=2, checkpoint_kimg=0.008,
                                           log_every=1, grid_size=2, out=str(tmp_path), cyclegan=cg))


def test_resume_mid_decay_is_exact_with_the_pools(photo_shards, tmp_path):
    """Stopped mid-decay and resumed, a run ends where the uninterrupted one does: the weights, the optimizer
    states, the lr (0 at the last step) and the history pools, which each rank keeps in its checkpoint part."""
    from conftest import stop_and_resume

    p = _params(tmp_path)
    cfg = {"params": p.model_dump(mode="json"), "stage": 0, "shards": str(photo_shards), "run_dir": None}
    full, part, resumed = stop_and_resume(cfg, tmp_path, stop=8, total=12)
    a, b, mid = load_state(full), load_state(resumed), load_state(part)
    assert 0 < mid["family_state"]["lr_schedule"]["factor"] < 1  # stopped while decaying
    assert a["family_state"]["lr_schedule"] == b["family_state"]["lr_schedule"]
    assert a["family_state"]["lr_schedule"]["factor"] == 0.0 and a["optimizers"]["G"]["param_groups"][0]["lr"] == 0
    for k in a["modules"]:
        for n, t in a["modules"][k].items():
            assert torch.equal(t, b["modules"][k][n]), f"{k}.{n}"
    for k in a["optimizers"]:  # Adam's moments of both generators and both discriminators
        for i, st in a["optimizers"][k]["state"].items():
            assert all(torch.equal(v, b["optimizers"][k]["state"][i][n]) for n, v in st.items()), f"{k}.{i}"
    pa, pb = (torch.load(Path(c, "rng-0.pt"), weights_only=True)["family"] for c in (full, resumed))
    assert pa["pool_A"].shape == (3, 3, 16, 16) and torch.equal(pa["pool_A"], pb["pool_A"])
    assert torch.equal(pa["pool_B"], pb["pool_B"])
    grid = Image.open(Path(full, "grid.png"))
    assert grid.size[0] > grid.size[1] * 2  # six columns (A, G(A), F(G(A)), B, F(B), G(F(B))) of two rows
