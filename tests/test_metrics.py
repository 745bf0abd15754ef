"""Metrics: closed forms, invariances, the published-protocol pieces, the reference cache."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ganforge.tasks.images import extract_features, image_set, reference_features
from ganforge.tasks.metrics import (
    FeatureExtractor, frechet_distance, inception_score_from_logits, kernel_inception_distance, quantize, tf1_resize,
)
from ganforge.tasks.params import DataParams
from ganforge.tasks.shard import shard


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "shards"
    shard("synthetic:shapes:24", out, DataParams(resolution=8, val_fraction=0.25, workers=1), progress=False)
    return out


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # non-diagonal: rotate both covariances by the same orthogonal matrix (FID is rotation invariant)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_quantization_matches_protocol():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 6).repeat(1, 3, 1, 1)
    q = quantize(x)
    assert q.dtype == torch.uint8 and q.shape == (1, 1, 6, 3)
    assert q[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]


def test_tf1_resize_hand_computed():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # TF1 legacy: source = dest * in/out = dest/2, edges clamp
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.allclose(tf1_resize(x, 4)[0, 0], expected)
    y = tf1_resize(torch.arange(3.0).view(1, 1, 1, 3).repeat(1, 1, 3, 1), 5)[0, 0, 0]
    assert torch.allclose(y, torch.tensor([0.0, 0.6, 1.2, 1.8, 2.0]))


def test_kid_known_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(300, 16))
    same, _, n = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert n == 200 and abs(same) < 0.01 and shifted > 0.1
    # one subset covering everything equals the direct unbiased estimator
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    k = lambda p, q: (p @ q.T / 4 + 1) ** 3  # noqa: E731
    direct = ((k(x, x).sum() - np.trace(k(x, x))) / 20 + (k(y, y).sum() - np.trace(k(y, y))) / 20 - 2 * k(x, y).mean())
    got, std, _ = kernel_inception_distance(x, y, subsets=3, subset_size=5)
    assert got == pytest.approx(direct) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_math():
    assert inception_score_from_logits(np.zeros((100, 1008)), 10)[0] == pytest.approx(1.0)
    onehot = np.full((50, 10), -1e4)
    onehot[np.arange(50), np.arange(50) % 10] = 0
    assert inception_score_from_logits(onehot, 1)[0] == pytest.approx(10.0, rel=1e-6)


def test_features_invariant_to_batch_and_workers(tiny_shards):
    s = image_set(str(tiny_shards), "val")
    assert s.count == 6
    f1 = extract_features(s, workers=1, batch_size=6, progress=False)
    f2 = extract_features(s, workers=1, batch_size=4, progress=False)
    f3 = extract_features(s, workers=2, batch_size=2, progress=False)
    assert f1.shape == (6, 2048)
    assert np.allclose(f1, f2, rtol=1e-4, atol=1e-5) and np.allclose(f1, f3, rtol=1e-4, atol=1e-5)
    # identical sets: FID ~ 0
    from ganforge.tasks.metrics import feature_stats
    st = feature_stats(f1)
    assert abs(frechet_distance(*st, *st)) < 1e-3


def test_extractor_matches_plain_model_loop(tiny_shards):
    """The optimised extractor (frozen, channels_last) gives the plain TorchScript model's features."""
    import warnings

    from ganforge.tasks.data import iter_split
    from ganforge.tasks.metrics import inception_weights_path

    imgs = next(iter_split(tiny_shards, "val", 6))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.jit.load(str(inception_weights_path())).eval()
    x = tf1_resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float()) / 128 - 1
    with torch.no_grad():
        ref = plain(x).numpy()
    got = FeatureExtractor("tf1")(imgs)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)
    clean = FeatureExtractor("clean")(imgs)
    assert clean.shape == ref.shape and not np.allclose(clean, ref, atol=1e-3)


def test_reference_cache_hit_and_invalidation(tiny_shards, tmp_path):
    cache = tmp_path / "cache"
    a = reference_features(tiny_shards, "val", "tf1", cache, progress=False)
    b = reference_features(tiny_shards, "val", "tf1", cache, progress=False)
    assert a["cache"] == "miss" and b["cache"] == "hit"
    assert np.array_equal(a["mu"], b["mu"]) and a["mu"].dtype == np.float64
    # new data (a different shuffle seed) -> new manifest hash -> recomputed
    other = tmp_path / "other"
    shard("synthetic:shapes:24", other, DataParams(resolution=8, val_fraction=0.25, workers=1, seed=9), progress=False)
    assert reference_features(other, "val", "tf1", cache, progress=False)["cache"] == "miss"
    # a damaged cache entry is recomputed
    Path(b["cache_path"]).write_bytes(b"junk")
    assert reference_features(tiny_shards, "val", "tf1", cache, progress=False)["cache"] == "miss"


def test_image_sets_and_fid_cli(tiny_shards, tmp_path):
    from ganforge.tasks.data import iter_split

    imgs = next(iter_split(tiny_shards, "val", 6))[0]
    np.save(tmp_path / "a.npy", imgs)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    assert image_set(str(tmp_path / "a.npy")).count == 6 and image_set(str(folder)).kind == "folder"
    with pytest.raises(ValueError, match="uint8"):
        np.save(tmp_path / "bad.npy", imgs.astype(np.float32))
        image_set(str(tmp_path / "bad.npy"))
    res = subprocess.run([sys.executable, "-m", "ganforge.flows.cli", "-q", "fid", str(tmp_path / "a.npy"), str(folder),
                          "--set", "eval.workers=1"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert abs(float(res.stdout.strip().splitlines()[-1])) < 1e-2  # the same images
    res = subprocess.run([sys.executable, "-m", "ganforge.flows.cli", "fid", str(tmp_path / "nope"), str(folder)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 4 and "nope" in res.stderr  # a missing input


# ----------------------------------------------------------------------------- precision, recall, density, coverage

def test_prdc_by_hand_on_a_line():
    """real 0,1,2,3 and fake 0.5,10 with k = 1: every real k-NN radius is 1 and both fake radii are 9.5.
    precision: 0.5 lies in the balls of 0 and 1, 10 in none -> 1/2; recall: every real lies within 9.5 of 0.5
    -> 1; density: 0.5 is in 2 balls, 10 in 0 -> 2 / (1 * 2) = 1; coverage: the nearest fake of 0 and 1 is 0.5
    (inside), of 2 and 3 it is 1.5 and 2.5 away (outside) -> 1/2."""
    from ganforge.tasks.metrics import knn_radii, prdc

    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert np.allclose(knn_radii(real, 1), 1.0) and np.allclose(knn_radii(fake, 1), 9.5)
    assert prdc(real, fake, pr_k=1, dc_k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_identical_sets_and_a_collapsed_one():
    from ganforge.tasks.metrics import prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    same = prdc(real, real.copy())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    # mode collapse onto one real image: every fake sits on a real point (precision 1); the fakes' k-NN balls
    # have radius 0, so only that point is recalled (1/200); it covers only the reals whose 5-NN ball holds it
    collapsed = prdc(real, np.repeat(real[:1], 200, axis=0))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] == 1 / 200 and collapsed["coverage"] <= 15 / 200


def test_prdc_in_row_blocks_equals_one_block():
    """The distance computation is batched (50k x 50k never in memory at once): any block size, same result."""
    from ganforge.tasks import metrics as M

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(120, 8)), rng.normal(0.3, 1.2, size=(90, 8))
    whole = M.prdc(real, fake)
    small = M._pairwise_blocks
    try:
        M._pairwise_blocks = lambda a, b: small(a, b, budget_bytes=8 * len(b) * 7)  # 7 rows at a time
        assert M.prdc(real, fake) == whole
    finally:
        M._pairwise_blocks = small
    with pytest.raises(ValueError, match="more than 5 points"):
        M.knn_radii(real[:5], 5)


def test_the_gate_can_compare_any_prdc_score():
    from ganforge.tasks.params import RegistryParams
    from ganforge.tasks.registry import gate_for

    for name in ("precision", "recall", "density", "coverage"):
        assert gate_for(RegistryParams(gate_metric=name), "progan") == (name, "higher")
