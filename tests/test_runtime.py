"""Ray is started from the run's own params everywhere: evaluation's parallel feature extraction and the
tokens stage used to call ``init_ray(Params())``, which ignored ``runtime.ray_address`` and the S3 endpoint.

A Ray cluster cannot exist on this machine, so these tests intercept ``ray.init`` (the one mock here) and check
what it is asked to connect to; the real local-Ray paths run in the Ray, Prefect and DVC tests."""

import pytest
import ray

from ganforge.tasks.params import EvalParams, RuntimeParams


class _Connect(Exception):
    pass


@pytest.fixture
def intercepted(monkeypatch, restore_environ):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise _Connect(kwargs.get("address"))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    return calls


CLUSTER = RuntimeParams(ray_address="ray://head.cluster:10001", s3_endpoint_url="http://minio.cluster:9000")


def test_evaluation_connects_to_the_configured_cluster(digits_shards, tmp_path, intercepted):
    from ganforge.tasks.images import reference_features

    with pytest.raises(_Connect):
        reference_features(digits_shards, "val", "tf1", tmp_path / "cache", workers=2, progress=False,
                           runtime=CLUSTER)
    (kw,) = intercepted
    assert kw["address"] == "ray://head.cluster:10001"
    assert kw["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio.cluster:9000"


def test_evaluate_passes_its_runtime_down(digits_shards, tmp_path, intercepted):
    from ganforge.tasks.evaluate import evaluate
    from ganforge.tasks.loop import LocalSession, run_stage
    from ganforge.tasks.params import TrainParams

    tp = TrainParams.model_validate(dict(family="toyvae", resolution=8, batch_size=8, grid_size=2,
                                         toyvae=dict(width=4)))
    s = LocalSession(tmp_path / "ckpt")
    run_stage({"params": tp.model_dump(mode="json"), "stage": 0, "shards": str(digits_shards), "run_dir": None,
               "max_steps": 1}, s)
    with pytest.raises(_Connect):
        evaluate(s.checkpoints[-1], digits_shards, EvalParams(workers=2, cache_dir=str(tmp_path / "c")),
                 progress=False, runtime=CLUSTER)
    assert intercepted[0]["address"] == "ray://head.cluster:10001"


def test_local_by_default(intercepted):
    from ganforge.tasks.runtime import init_ray

    with pytest.raises(_Connect):
        init_ray(RuntimeParams())
    assert "address" not in intercepted[0] and "runtime_env" not in intercepted[0]


def test_each_tools_variable_beats_a_default_not_a_setting(monkeypatch, intercepted):
    """MLFLOW_TRACKING_URI, PREFECT_API_URL and RAY_ADDRESS (as the user's shell set them) replace a params
    default; a value set in params wins; each value says where it came from."""
    from ganforge.tasks import params as P
    from ganforge.tasks.runtime import init_ray

    monkeypatch.setitem(P._USER_ENV, "mlflow_tracking_uri", "http://tracking.team:5000")
    monkeypatch.setitem(P._USER_ENV, "ray_address", "ray://head.team:10001")
    monkeypatch.setitem(P._USER_ENV, "prefect_api_url", "http://prefect.team:4200/api")
    r = RuntimeParams()
    assert (r.mlflow_tracking_uri, r.ray_address, r.prefect_api_url) == (
        "http://tracking.team:5000", "ray://head.team:10001", "http://prefect.team:4200/api")
    assert r.source("mlflow_tracking_uri") == "MLFLOW_TRACKING_URI in the environment"
    with pytest.raises(_Connect, match="head.team"):
        init_ray(r)
    mine = RuntimeParams(mlflow_tracking_uri="sqlite:///mine.db", ray_address="auto")
    assert mine.mlflow_tracking_uri == "sqlite:///mine.db" and mine.source("mlflow_tracking_uri") == "params"
    assert mine.ray_address == "auto" and mine.prefect_api_url == "http://prefect.team:4200/api"
    monkeypatch.setitem(P._USER_ENV, "mlflow_tracking_uri", "")
    assert RuntimeParams().source("mlflow_tracking_uri") == "the default"


def test_the_cli_honours_mlflow_tracking_uri(tmp_path):
    """A shell pointing at a tracking store: `ganforge models` uses it, and says so; --set still wins."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/team.db"}
    cmd = [sys.executable, "-m", "ganforge.flows.cli", "models"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"MLflow: sqlite:///{tmp_path}/team.db (from MLFLOW_TRACKING_URI in the environment)" in r.stderr
    assert (tmp_path / "team.db").exists() and not (tmp_path / "mlflow.db").exists()
    r = subprocess.run([*cmd, "--set", "runtime.mlflow_tracking_uri=sqlite:///own.db"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "own.db").exists(), r.stderr[-2000:]
    assert "(from params)" in r.stderr
