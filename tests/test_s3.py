"""The pipeline against S3-compatible storage served locally (moto's server mode, a real HTTP S3 API):
shards read from s3://, Ray Train checkpoints on s3:// (with resume), evaluation of an s3:// checkpoint,
MLflow artifacts on s3:// (register + load the model back), and a DVC remote on s3:// (push, then pull
into an empty cache). Only the endpoint and credentials differ from AWS or MinIO."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ganforge.tasks.params import Params

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on localhost, credentials in the environment, a fresh Ray that inherits them."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "GANFORGE_CACHE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      GANFORGE_CACHE=str(tmp_path_factory.mktemp("cache")))
    client = boto3.client("s3", endpoint_url=endpoint)
    for b in ("data", "ray", "mlflow", "dvc"):
        client.create_bucket(Bucket=b)
    ray.shutdown()
    yield endpoint, client
    ray.shutdown()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _keys(client, bucket: str) -> list[str]:
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def test_pipeline_on_s3_storage(s3, digits_shards, tmp_path):
    import fsspec
    import ray

    from ganforge.tasks.data import TrainStream, iter_split
    from ganforge.tasks.evaluate import evaluate
    from ganforge.tasks.registry import register, sample_registered, setup_mlflow, start_pipeline_run
    from ganforge.tasks.checkpoint import latest_checkpoint
    from ganforge.tasks.runtime import init_ray
    from ganforge.tasks.train import train

    endpoint, client = s3
    p = Params.model_validate({
        "data": {"shards": "s3://data/digits16"},
        "train": dict(out=str(tmp_path / "run"), resolution=8, workers=2, batch_size=16, checkpoint_kimg=0.032,
                      log_every=2, max_failures=1, grid_size=2,
                      progan=dict(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.032, stabilize_kimg=0.032)),
        "eval": dict(num_samples=8, kid_subsets=3, workers=1, cache_dir=str(tmp_path / "fid")),
        "runtime": dict(ray_storage="s3://ray/runs", s3_endpoint_url=endpoint,
                        mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_artifact_root="s3://mlflow/artifacts"),
    })
    init_ray(p.runtime)  # exports the endpoint here and to every Ray worker
    assert os.environ["AWS_ENDPOINT_URL"] == endpoint
    assert ray.get_runtime_context().runtime_env.get("env_vars", {}).get("AWS_ENDPOINT_URL") == endpoint

    # shards: uploaded once (what `dvc push` or `aws s3 sync` does), then read from s3:// by URL
    fs = fsspec.filesystem("s3")
    fs.put(str(digits_shards) + "/", "data/digits16/", recursive=True)
    stream = TrainStream("s3://data/digits16", 8, 4)
    real, _ = next(iter(stream))
    local, _ = next(iter(TrainStream(digits_shards, 8, 4)))
    assert real.shape == (4, 3, 8, 8) and (real == local).all()  # same bytes, same batch
    first = next(iter_split("s3://data/digits16", "val", 5))[0]
    assert (first == next(iter_split(digits_shards, "val", 5))[0]).all()

    # Ray Train checkpoints on S3; a re-run finds them there and skips/resumes
    summary = train("s3://data/digits16", p.train.out, p)
    final = summary["final_checkpoint"]
    assert final.startswith("s3://ray/runs/run/progan-r0008-"), final
    keys = _keys(client, "ray")
    assert any(k.endswith("ckpt-0000000032/state.pt") and "progan-r0004" in k for k in keys)
    assert any(k.endswith("/grid.png") for k in keys)
    from ganforge.models.families import get_family

    st = get_family(p.train).stages()[1]
    assert latest_checkpoint("s3://ray/runs/run", st) == final
    assert (Path(p.train.out) / "stages" / "progan-r0008" / "state.pt").exists()  # exported locally for DVC
    # a driver that died after the last checkpoint but before summary.json: the re-run takes it from S3
    summary_path = Path(p.train.out) / "summary.json"
    rec = json.loads(summary_path.read_text())
    del rec["stages"]["progan-r0008"]
    summary_path.write_text(json.dumps(rec))
    shutil.rmtree(Path(p.train.out) / "stages" / "progan-r0008")
    again = train("s3://data/digits16", p.train.out, p)
    assert again["final_checkpoint"] == final and again["stages"]["progan-r0008"]["resumed_from"] == final
    assert (Path(p.train.out) / "stages" / "progan-r0008" / "state.pt").exists()

    # evaluation reads the checkpoint from S3
    res = evaluate(final, "s3://data/digits16", p.eval, progress=False)
    assert res["fid"] > 0 and res["reference"]["count"] == 180

    # MLflow artifacts on S3: the registered generator lives in the bucket and loads back from it
    run_id = start_pipeline_run(p, "s3://data/digits16", run_name="s3")
    reg = register(final, res, p, run_id, data_sha256="x")
    assert any(k.startswith("artifacts/") and k.endswith("MLmodel") for k in _keys(client, "mlflow"))
    setup_mlflow(p.runtime)
    imgs = sample_registered(reg["model_uri"], [0, 1])
    assert imgs.shape == (2, 8, 8, 3)


def test_dvc_remote_on_s3(s3, tmp_path):
    """`ganforge dvc-remote` points DVC at runtime.dvc_remote (+ the S3 endpoint); push, then pull into an empty cache."""
    endpoint, client = s3
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (repo / "data").mkdir()
    (repo / "data" / "a.bin").write_bytes(os.urandom(4096))
    (repo / "data" / "b.txt").write_text("shard manifest\n")
    out = run("ganforge", "-q", "dvc-remote", "--set", "runtime.dvc_remote=s3://dvc/cache",
              "--set", f"runtime.s3_endpoint_url={endpoint}")
    assert json.loads(out)["remote"] == "s3://dvc/cache"
    assert endpoint in (repo / ".dvc" / "config").read_text()
    run("dvc", "add", "-q", "data")
    run("dvc", "push", "-q")
    assert len(_keys(client, "dvc")) >= 3  # two files + the directory listing
    original = (repo / "data" / "a.bin").read_bytes()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run("dvc", "pull", "-q")
    assert (repo / "data" / "a.bin").read_bytes() == original
