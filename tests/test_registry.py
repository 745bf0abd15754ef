"""Real MLflow on sqlite in a temp folder: tracking, registry, pyfunc round trip, the promotion gate."""

import json
import multiprocessing as mp

import numpy as np
import pytest

from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import DataParams, Params
from ganforge.tasks.registry import PromotionRefused, list_models, log_training, promote, register, sample_registered, start_pipeline_run
from ganforge.tasks.shard import manifest_hash, shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    shards = root / "shards"
    shard("synthetic:shapes:32", shards, DataParams(resolution=8, workers=1), progress=False)
    p = Params.model_validate({
        "train": dict(resolution=8, batch_size=8, checkpoint_kimg=0.032, log_every=2,
                      progan=dict(fmap_max=16, fmap_base=64, latent_dim=16, start_resolution=8, stabilize_kimg=0.064)),
        "runtime": dict(mlflow_tracking_uri=f"sqlite:///{root}/mlflow.db", mlflow_artifact_root=str(root / "art")),
        "registry": dict(model_name="test-gen", min_improvement=0.5),
    })
    run_dir = root / "run"
    s = LocalSession(root / "ckpts")
    run_stage({"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(shards), "run_dir": str(run_dir)}, s)
    return p, shards, s.checkpoints[-1], run_dir


def _eval(fid, shards, protocol="tf1", n=100):
    return {"fid": fid, "kid": 0.01, "protocol": protocol, "num_samples": n,
            "reference": {"manifest_sha256": manifest_hash(shards), "split": "val", "count": 4}}


def test_tracking_nested_runs_with_history(setup):
    import mlflow

    p, shards, ckpt, run_dir = setup
    run_id = start_pipeline_run(p, shards, "t")
    summary = {"stages": {"progan-r0008": {"index": 0, "resolution": 8, "checkpoint": ckpt, "wall_time_s": 1.0,
                                           "images_per_s": 10.0}}}
    log_training(summary, run_dir, p, run_id)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.params["train.progan.lr"] == "0.001" and run.data.tags["data.manifest_sha256"] == manifest_hash(shards)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1
    hist = client.get_metric_history(children[0].info.run_id, "loss_d")
    assert len(hist) >= 3 and sorted(h.step for h in hist) == [h.step for h in sorted(hist, key=lambda h: h.step)]
    arts = [a.path for a in client.list_artifacts(children[0].info.run_id, "samples")]
    assert arts and all(a.endswith(".png") for a in arts)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss_curves.png"]


def test_register_load_and_gate(setup):
    p, shards, ckpt, _ = setup
    run_id = start_pipeline_run(p, shards, "reg")
    with pytest.raises(PromotionRefused, match="no FID"):
        v0 = register(ckpt, None, p, run_id, data_sha256="x")
        promote("test-gen", v0["version"], p)
    v1 = register(ckpt, _eval(30.0, shards), p, run_id, data_sha256="x")
    imgs = sample_registered("models:/test-gen@challenger", [0, 1, 2])
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 8, 8, 3)
    again = sample_registered(f"models:/test-gen/{v1['version']}", [0, 1, 2])
    assert np.array_equal(imgs, again), "seeds map to images deterministically"
    d1 = promote("test-gen", v1["version"], p)
    assert d1["promoted"] and "first eligible" in d1["reason"]
    v2 = register(ckpt, _eval(29.8, shards), p, run_id, data_sha256="x")  # better, but by less than 0.5
    d2 = promote("test-gen", None, p)  # the challenger
    assert d2["version"] == v2["version"] and not d2["promoted"] and "at least 0.5" in d2["reason"]
    v3 = register(ckpt, _eval(20.0, shards), p, run_id, data_sha256="x")
    assert promote("test-gen", v3["version"], p)["promoted"]
    v4 = register(ckpt, _eval(5.0, shards, n=50), p, run_id, data_sha256="x")  # different sample count
    d4 = promote("test-gen", v4["version"], p)
    assert not d4["promoted"] and "num_samples" in d4["reason"]
    d5 = promote("test-gen", v2["version"], p, force=True)
    assert d5["promoted"] and d5["forced"]
    rows = {r["version"]: r for r in list_models(p, "test-gen")}
    assert rows[v2["version"]]["aliases"] == ["champion"] and rows[v4["version"]]["aliases"] == ["challenger"]
    assert rows[v4["version"]]["decision"] == "refused" and rows[v3["version"]]["fid"] == repr(20.0)
    # the same checkpoint with the same metrics is not registered twice
    again = register(ckpt, _eval(20.0, shards), p, run_id, data_sha256="x")
    assert again["version"] == v3["version"] and again.get("existing")
    from mlflow import MlflowClient

    assert MlflowClient().get_model_version("test-gen", str(v2["version"])).tags["promotion.forced"] == "True"


def test_registered_model_is_code_and_data_and_loads_without_warnings(setup, tmp_path):
    """Logged from code (nothing pickled): the model holds tasks/pyfunc_model.py, weights.pt and config.json; a
    fresh interpreter loads it and predicts with no warning (no cloudpickle, no type-hint notice); `ganforge
    sample --out x.npy` gives the pyfunc's bytes; the version's description says what it is."""
    import subprocess
    import sys

    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.artifacts import download_artifacts

    p, shards, ckpt, _ = setup
    run_id = start_pipeline_run(p, shards, "code")
    v = register(ckpt, _eval(31.0, shards), p, run_id, data_sha256="d" * 64)
    local = download_artifacts(v["model_uri"], dst_path=str(tmp_path / "m"))
    conf = Model.load(local).flavors["python_function"]
    assert conf["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in conf
    assert sorted(conf["artifacts"]) == ["config", "weights"]
    assert (tmp_path / "m" / "pyfunc_model.py").exists() and not list((tmp_path / "m").rglob("*.pkl"))
    desc = MlflowClient().get_model_version("test-gen", str(v["version"])).description
    for part in ("**progan** generator, 8×8", "`dddddddddddddddd…`", "FID **31**", "protocol tf1, 100 samples",
                 "registered/progan-r0008-grid.png", f"run_uuid={run_id}"):
        assert part in desc, (part, desc)
    assert "registered/progan-r0008-grid.png" in [a.path for a in MlflowClient().list_artifacts(run_id, "registered")]
    code = (f"import mlflow, pandas as pd; mlflow.set_tracking_uri({p.runtime.mlflow_tracking_uri!r}); "
            f"m = mlflow.pyfunc.load_model('models:/test-gen/{v['version']}'); "
            f"import numpy as np; np.save('pyfunc.npy', m.predict(pd.DataFrame({{'seed': [5, 6, 7]}})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(w in r.stderr for w in ("loudPickle", "type hints", "Warning")), r.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "ganforge.flows.cli", "-q", "sample", "--model",
                          f"models:/test-gen/{v['version']}", "--n", "3", "--seed", "5", "--out", "cli.npy",
                          "--set", f"runtime.mlflow_tracking_uri={p.runtime.mlflow_tracking_uri}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    a, b = np.load(tmp_path / "pyfunc.npy"), np.load(tmp_path / "cli.npy")
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8 and a.tobytes() == b.tobytes()


def test_a_model_logged_by_the_earlier_layout_still_loads():
    """tests/fixtures/legacy_pyfunc: a tiny ProGAN as ganforge logged it before models-from-code (a cloudpickled
    PythonModel that calls ganforge.tasks.checkpoint.load_generator and ganforge.tasks.registry.predict, with the
    checkpoint folder as its artifact). It loads and gives the images it gave then."""
    import warnings
    from pathlib import Path

    import mlflow.pyfunc
    import pandas as pd

    fixtures = Path(__file__).parent / "fixtures"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns about unpickling: that is what the old layout did
        model = mlflow.pyfunc.load_model(str(fixtures / "legacy_pyfunc"))
    imgs = model.predict(pd.DataFrame({"seed": [0, 1, 2]}))
    assert np.array_equal(imgs, np.load(fixtures / "legacy_pyfunc_seeds_0_1_2.npy"))


def _register_in_process(args):
    p_json, ckpt, fid, q = args
    p = Params.model_validate(json.loads(p_json))
    run_id = start_pipeline_run(p, p.data.shards, "concurrent")
    q.put(register(ckpt, _eval(fid, p.data.shards), p, run_id, data_sha256="c")["version"])


def test_gate_reads_metric_and_direction_from_params(setup):
    """A higher-is-better score (a classifier's accuracy) gates promotion when params say so."""
    p, shards, ckpt, _ = setup
    q = Params.model_validate({**p.model_dump(mode="json"), "registry": {
        "model_name": "test-acc", "gate_metric": "accuracy", "gate_direction": "higher", "min_improvement": 0.01}})
    run_id = start_pipeline_run(q, shards, "acc")

    def ev(acc):
        return {**_eval(50.0, shards), "scores": {"accuracy": acc, "fid": 50.0}}

    a = register(ckpt, ev(0.80), q, run_id, data_sha256="x")
    assert promote("test-acc", a["version"], q)["promoted"]
    b = register(ckpt, ev(0.805), q, run_id, data_sha256="x")
    d = promote("test-acc", b["version"], q)
    assert not d["promoted"] and d["metric"] == "accuracy" and "by at least 0.01" in d["reason"]
    c = register(ckpt, ev(0.90), q, run_id, data_sha256="x")
    d = promote("test-acc", c["version"], q)
    assert d["promoted"] and "accuracy 0.9000 beats champion 0.8000" in d["reason"]
    with pytest.raises(PromotionRefused, match="no accuracy"):
        promote("test-acc", register(ckpt, _eval(10.0, shards), q, run_id, data_sha256="x")["version"], q)


def test_concurrent_registration(setup, tmp_path):
    p, shards, ckpt, _ = setup
    p2 = p.model_copy(deep=True)
    p2.data.shards = str(shards)
    p2.registry.model_name = "concurrent-gen"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_register_in_process, args=((p2.model_dump_json(), ckpt, 10.0 + i, q),)) for i in range(2)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(240)
    assert all(pr.exitcode == 0 for pr in procs)
    versions = sorted(q.get(timeout=5) for _ in procs)
    assert versions == [1, 2]


def test_a_translator_registers_a_model_that_takes_images(tmp_path):
    """An image-to-image family (CycleGAN's shape) registers a model from images to images."""
    import mlflow.pyfunc

    from ganforge.tasks.data import iter_split
    from ganforge.tasks.registry import setup_mlflow

    shards = tmp_path / "shards"
    shard("synthetic:shapes:24", shards, DataParams(resolution=8, workers=1, val_fraction=0.25), progress=False)
    p = Params.model_validate({
        "data": {"shards": str(shards)},
        "train": dict(family="toyinvert", resolution=8, batch_size=8, checkpoint_kimg=1.0, grid_size=2,
                      ema_half_life_kimg=0.01),
        "runtime": dict(mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_artifact_root=str(tmp_path / "art")),
        "registry": dict(model_name="test-translator")})
    s = LocalSession(tmp_path / "c")
    run_stage({"params": p.train.model_dump(mode="json"), "stage": 0, "shards": str(shards), "run_dir": None,
               "max_steps": 40}, s)
    reg = register(s.checkpoints[-1], None, p, start_pipeline_run(p, shards, "t"), data_sha256="x")
    assert reg["tags"]["product"] == "translator"
    setup_mlflow(p.runtime)
    model = mlflow.pyfunc.load_model(reg["model_uri"])
    imgs, _ = next(iter_split(shards, "val", 4))
    out = np.asarray(model.predict(imgs))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    # it learned x -> -x: the translation is much closer to the inverted image than to the input
    inv = 255 - imgs.astype(int)
    assert np.abs(out.astype(int) - inv).mean() < 0.5 * np.abs(out.astype(int) - imgs.astype(int)).mean()
    with pytest.raises(Exception, match="uint8"):
        model.predict(imgs.astype(np.float32))
