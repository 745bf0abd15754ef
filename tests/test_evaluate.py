import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ganforge.tasks.evaluate import evaluate
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.images import ImageSet, _read_slice
from ganforge.tasks.params import EvalParams, Params
from ganforge.tasks.shard import shard
from ganforge.tasks.params import DataParams


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    shards = root / "shards"
    shard("synthetic:shapes:40", shards, DataParams(resolution=8, val_fraction=0.25, workers=1), progress=False)
    p = Params.model_validate({"train": dict(resolution=8, batch_size=8, checkpoint_kimg=1, progan=dict(
        fmap_max=16, fmap_base=64, latent_dim=16, start_resolution=8, stabilize_kimg=0.04))})
    s = LocalSession(root / "ckpts")
    run_stage({"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(shards), "run_dir": None}, s)
    return shards, s.checkpoints[-1], root


def test_generated_images_do_not_depend_on_batch(tiny_run):
    _, ckpt, _ = tiny_run
    a = np.concatenate(list(_read_slice(ImageSet("generator", ckpt, count=7, seed=3), 0, 7, 7)))
    b = np.concatenate(list(_read_slice(ImageSet("generator", ckpt, count=7, seed=3), 0, 7, 3)))
    c = np.concatenate(list(_read_slice(ImageSet("generator", ckpt, count=7, seed=3), 4, 7, 2)))
    assert a.dtype == np.uint8 and a.shape == (7, 8, 8, 3)
    assert np.array_equal(a, b) and np.array_equal(a[4:], c)


def test_evaluate_reports_protocol_and_null_is(tiny_run, tmp_path):
    shards, ckpt, _ = tiny_run
    ev = EvalParams(num_samples=12, metrics=["fid", "kid", "is"], workers=1, kid_subsets=5, cache_dir=str(tmp_path / "c"))
    r = evaluate(ckpt, shards, ev, out=tmp_path / "out", progress=False)
    assert r["fid"] > 0 and np.isfinite(r["fid"]) and "kid" in r and r["kid_subset_size"] == 10
    assert r["protocol"] == "tf1" and r["reference"]["split"] == "val" and r["reference"]["count"] == 10
    assert r["is"] is None and "inception_logits_path" in r["is_unavailable"]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["fid"] == pytest.approx(r["fid"]) and m["is"] is None and m["protocol"] == "tf1"
    assert (tmp_path / "out" / "samples.png").exists()
    r2 = evaluate(ckpt, shards, ev, progress=False)
    assert r2["reference"]["cache"] == "hit" and r2["fid"] == pytest.approx(r["fid"], rel=1e-9)


def test_evaluate_cli_last_line_is_json_and_missing_checkpoint(tiny_run, tmp_path):
    shards, ckpt, _ = tiny_run
    cmd = [sys.executable, "-m", "ganforge.flows.cli", "-q", "evaluate", "--checkpoint", ckpt, "--data", str(shards),
           "--num-samples", "8", "--metrics", "fid", "--workers", "1", "--set", f"eval.cache_dir={tmp_path}/c"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fid"] > 0 and out["protocol"] == "tf1" and out["num_samples"] == 8
    bad = cmd.copy()
    bad[bad.index(ckpt)] = str(tmp_path / "missing")
    res = subprocess.run(bad, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 4 and "not found" in res.stderr  # a missing input
    res = subprocess.run(cmd[:-2] + ["--metrics", "fid,bogus"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 2 and "eval.metrics" in res.stderr


def test_a_metric_from_another_package(tiny_run, tmp_path):
    """`mean_gap` is registered by tests/plugins through the `ganforge.metrics` entry point: it is a valid
    eval.metrics name, is computed, reported with its direction and written to metrics.json, with no key list
    in ganforge naming it."""
    from ganforge.tasks.params import ParamsError, load_params

    shards, ckpt, _ = tiny_run
    ev = EvalParams(num_samples=12, metrics=["fid", "mean_gap"], workers=1, kid_subsets=5,
                    cache_dir=str(tmp_path / "c"))
    r = evaluate(ckpt, shards, ev, out=tmp_path / "out", progress=False)
    assert 0 < r["scores"]["mean_gap"] <= r["fid"] + 1e-6  # the mean term alone, the trace term is >= 0
    assert r["directions"]["mean_gap"] == "lower"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["mean_gap"] == pytest.approx(r["mean_gap"])
    with pytest.raises(ParamsError, match=r"eval.metrics.0: .*'mean_gap'.*\(got 'nope'\)"):
        load_params(None, {"eval.metrics": ["nope"]})


def test_prdc_join_the_evaluation_and_the_radii_are_cached(tiny_run, tmp_path):
    """precision/recall/density/coverage: computed on the FID features, reported with the backbone and k, in
    scores (so in MLflow, the registry tags, the gate) and metrics.json; the reference radii are cached beside
    the reference statistics and reused. Too few images for k: null with the reason."""
    from ganforge.tasks.images import reference_features
    from ganforge.tasks.metrics import cached_radii, knn_radii

    shards, ckpt, _ = tiny_run
    ev = EvalParams(num_samples=12, workers=1, kid_subsets=5, cache_dir=str(tmp_path / "c"))
    assert ev.metrics == ["fid", "kid", "precision", "recall", "density", "coverage"]
    r = evaluate(ckpt, shards, ev, out=tmp_path / "out", progress=False)
    for k in ("precision", "recall", "coverage"):
        assert 0 <= r["scores"][k] <= 1 and r["directions"][k] == "higher"
    assert r["scores"]["density"] >= 0 and (r["pr_k"], r["dc_k"]) == (3, 5) and "VGG16" in r["prdc_features"]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["precision"] == r["precision"] and m["coverage"] == r["coverage"]
    radii = sorted(p.name for p in (tmp_path / "c").glob("*.radii-k*.npy"))
    assert len(radii) == 2 and radii[0].endswith(".radii-k3.npy")
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.radii-k*.npy")}
    ref = reference_features(shards, "val", "tf1", tmp_path / "c", progress=False)
    assert ref["cache"] == "hit" and np.array_equal(cached_radii(ref, 3), knn_radii(ref["features"], 3))
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # read back, not recomputed
    few = evaluate(ckpt, shards, EvalParams(num_samples=4, workers=1, kid_subsets=2, cache_dir=str(tmp_path / "c")),
                   progress=False)
    assert few["precision"] is None and "more than k = 5" in few["prdc_unavailable"]
    assert "precision" not in few["scores"] and few["fid"] > 0
