"""A deployment created against a test Prefect server and a run triggered through the API completes.
The deployment is served by `ganforge serve` in a subprocess (what a user runs next to `prefect server start`)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_deployment_run_through_the_api(tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source="synthetic:shapes:32", shards=str(tmp_path / "shards"), resolution=8, workers=1)
    p["train"].update(out=str(tmp_path / "run"), resolution=4, batch_size=16, checkpoint_kimg=1.0, log_every=2)
    p["train"]["progan"].update(fmap_max=16, fmap_base=64, latent_dim=16, stabilize_kimg=0.032)
    p["eval"].update(num_samples=6, kid_subsets=2, workers=1, cache_dir=str(tmp_path / "cache"))
    p["runtime"].update(mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_artifact_root=str(tmp_path / "art"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=120):
        api = PREFECT_API_URL.value()
        env = {**os.environ, "PREFECT_API_URL": api, "RAY_USAGE_STATS_ENABLED": "0"}
        server = subprocess.Popen([sys.executable, "-m", "ganforge.flows.cli", "serve", "--params", str(tmp_path / "params.yaml")],
                                  cwd=ROOT, env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
        try:
            run = None
            deadline = time.time() + 120
            while run is None and time.time() < deadline:  # wait until the deployment is registered
                try:
                    run = run_deployment("train-pipeline/ganforge", parameters={"overrides": {"eval.num_samples": 5}},
                                         timeout=0)
                except Exception:  # noqa: BLE001 - not yet registered
                    time.sleep(2)
            assert run is not None, (tmp_path / "serve.log").read_text()[-3000:]
            from prefect import get_client
            import anyio

            async def wait():
                async with get_client() as c:
                    for _ in range(240):
                        fr = await c.read_flow_run(run.id)
                        if fr.state.is_final():
                            return fr
                        await anyio.sleep(2)
                    return fr

            fr = anyio.run(wait)
            assert fr.state.is_completed(), (fr.state, (tmp_path / "serve.log").read_text()[-4000:])

            async def schema():
                async with get_client() as c:
                    return (await c.read_deployment_by_name("train-pipeline/ganforge")).parameter_openapi_schema

            # the UI's custom-run form is rendered from this schema: every section, every family's section,
            # the family drop-down, descriptions and defaults
            from ganforge.models.families import family_classes

            sch = anyio.run(schema)
            defs = sch.get("definitions") or sch.get("$defs")
            assert {"data", "train", "eval", "registry", "runtime"} <= set(defs["Params"]["properties"])
            train = defs["TrainParams"]["properties"]
            assert set(family_classes()) <= set(train) and set(train["family"]["enum"]) == set(family_classes())
            assert train["family"]["default"] == "progan" and "description" in train["family"]
            assert defs["ProGANParams"]["properties"]["fmap_max"]["description"]
            assert "default" in defs["VQGANParams"]["properties"]["n_embed"]
        finally:
            server.terminate()
            server.wait(30)
    assert (tmp_path / "run" / "eval" / "metrics.json").exists()
    import json

    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["num_samples"] == 5


def test_work_pool_deployment_runs_on_a_prefect_worker(tmp_path):
    """`ganforge deploy --work-pool` (what infra/compose.yaml and infra/k8s run) registers deployments that a
    `prefect worker` of that pool executes from the installed code: here an evaluate run without a checkpoint,
    which must reach our flow and fail with its own message."""
    import anyio
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_USAGE_STATS_ENABLED": "0"}

        def cli(*args, timeout=180):
            r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            return r.stdout

        bin_dir = Path(sys.executable).parent
        cli(str(bin_dir / "prefect"), "work-pool", "create", "gf-test", "--type", "process")
        out = cli(str(bin_dir / "ganforge"), "-q", "deploy", "--work-pool", "gf-test")
        assert len(json.loads(out.strip().splitlines()[-1])["deployments"]) == 4  # the last line is the result

        async def deployment():
            async with get_client() as c:
                return await c.read_deployment_by_name("evaluate/ganforge")

        dep = anyio.run(deployment)
        assert dep.work_pool_name == "gf-test" and dep.entrypoint == "flows/pipeline.py:evaluate_flow"
        run = run_deployment("evaluate/ganforge", timeout=0)
        cli(str(bin_dir / "prefect"), "worker", "start", "--pool", "gf-test", "--run-once", timeout=240)

        async def final_state():
            async with get_client() as c:
                return (await c.read_flow_run(run.id)).state

        state = anyio.run(final_state)
        assert state.is_failed() and "give a checkpoint or a model_uri" in (state.message or "") + str(
            state.result(raise_on_failure=False)), state
