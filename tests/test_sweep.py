"""`ganforge sweep`: the search space is checked before Ray starts (one line, exit 2), and a real sweep (Prefect
flow on the test harness, Ray Tune with ASHA over Ray Train trials, the FID curve, MLflow on sqlite) stops poor
trials early, resumes after its driver is killed without running finished trials again, and writes a params file
that reproduces the best trial's first-stage checkpoint exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ganforge.tasks.params import Params, ParamsError
from ganforge.tasks.sweep import check_space, parse_space, trial_count

BIN = Path(sys.executable).parent
EVERY, TOTAL = 0.32, 0.64  # the curve's interval and the trials' length (kimg): one ASHA rung, at 0.32


def test_space_from_a_file_and_flags(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump({"space": {"train.progan.lr": {"loguniform": [1e-4, 1e-2]},
                                           "train.progan.r1_gamma": [1, 10]}}))
    space = parse_space(str(f), grid=["train.batch_size=16,32"], choice=["train.seed=0,1,2"])
    assert space == {"train.progan.lr": {"loguniform": [1e-4, 1e-2]}, "train.progan.r1_gamma": {"grid": [1, 10]},
                     "train.batch_size": {"grid": [16, 32]}, "train.seed": {"choice": [0, 1, 2]}}
    assert trial_count(space, 3) == 3 * 2 * 2
    check_space(Params().model_dump(mode="json"), space)


@pytest.mark.parametrize("args, message", [
    ({"grid": ["train.progan.lrr=1,2"]}, "sweep space train.progan.lrr: not a params key"),
    ({"grid": ["data.resolution=8,16"]}, "sweep space data.resolution: not swept"),
    ({"loguniform": ["train.progan.lr=0,0.1"]}, "train.progan.lr: loguniform takes two numbers LOW < HIGH (both > 0)"),
    ({"uniform": ["train.progan.lr=0.1"]}, "uniform takes two numbers LOW < HIGH, got [0.1]"),
    ({"choice": ["train.progan.lr"]}, "--choice expects KEY=V1,V2"),
    ({"grid": ["train.batch_size=16,1"]}, "sweep space train.batch_size=1: train.batch_size: Input should be "
                                          "greater than or equal to 2"),
    ({}, "the sweep has an empty search space"),
])
def test_a_bad_space_is_one_line_naming_the_key(args, message):
    with pytest.raises(ParamsError) as e:
        check_space(Params().model_dump(mode="json"), parse_space(None, **args))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_space_before_ray(tmp_path, capsys):
    from ganforge.flows.cli import main

    bad = tmp_path / "space.yaml"
    bad.write_text("train.progan.lr: {between: [1, 2]}\n")
    assert main(["sweep", "--space", str(bad), "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ganforge sweep: {bad}: train.progan.lr: give exactly one of grid, choice, loguniform, uniform "
                   f"(got {{'between': [1, 2]}})"]
    assert main(["sweep", "--grid", "train.progan.lr=0.001,0.002", "--out", str(tmp_path / "sw")]) == 2
    assert "set eval.every_kimg" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


# ----------------------------------------------------------------------------- a real sweep


def _params_file(tmp_path: Path, shards: Path) -> Path:
    p = {"data": {"shards": str(shards)},
         "train": {"family": "progan", "resolution": 8, "workers": 1, "batch_size": 16, "checkpoint_kimg": EVERY,
                   "log_every": 5, "max_failures": 0, "grid_size": 2,
                   "progan": {"start_resolution": 8, "fmap_max": 16, "fmap_base": 64, "latent_dim": 16,
                              "transition_kimg": 0, "stabilize_kimg": TOTAL}},
         "eval": {"every_kimg": EVERY, "every_num_samples": 16, "num_samples": 16, "kid_subsets": 3, "workers": 1,
                  "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    """Digits at 8px with a small val split (54 images): the reference statistics of the curve take seconds."""
    from ganforge.tasks.params import DataParams
    from ganforge.tasks.shard import shard

    out = tmp_path_factory.mktemp("digits8") / "shards"
    shard("digits", out, DataParams(resolution=8, shard_size=1000, workers=1, val_fraction=0.03), progress=False)
    return out


@pytest.mark.slow
def test_sweep_stops_early_resumes_after_a_kill_and_its_best_params_reproduce(tmp_path, digits8):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    params = _params_file(tmp_path, digits8)
    out = tmp_path / "sweep"
    cmd = [str(BIN / "ganforge"), "-q", "sweep", "--params", str(params), "--out", str(out), "--max-concurrent", "1",
           "--grid", "train.progan.lr=0.003,0.000001", "--grid", "train.seed=0,1", "--register"]
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        # 1. the driver is killed (SIGKILL, its whole process group) once the first trial has finished
        log1 = open(tmp_path / "first.log", "w")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        done: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            done = [t for t in (out / "trials").glob("*/trial.json") if json.loads(t.read_text())["status"] == "completed"]
            if done:
                break
            time.sleep(0.5)
        assert done and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(4)  # Tune saves its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        first = done[0].parent
        history_before = (first / "metrics").glob("*.jsonl")
        before = {p.name: p.read_text() for p in history_before}
        summary_before = (first / "summary.json").read_text()

        # 2. the same command resumes: the finished trial is not trained again, the others are run
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "resuming the sweep" in r.stdout + r.stderr
        assert {p.name: p.read_text() for p in (first / "metrics").glob("*.jsonl")} == before
        assert (first / "summary.json").read_text() == summary_before
        result = json.loads(r.stdout.strip().splitlines()[-1])
        summary = json.loads((out / "trials.json").read_text())
        trials = summary["trials"]
        assert len(trials) == 4 and result["trials"] == 4
        statuses = [t["status"] for t in trials]
        assert statuses.count("stopped early") >= 1 and result["stopped_early"] >= 1, statuses
        assert all(s in ("completed", "stopped early") for s in statuses), statuses
        fids = [t["best_fid"] for t in trials]
        assert fids == sorted(fids) and result["best"]["trial_id"] == trials[0]["trial_id"]
        for t in trials:  # a stopped trial has fewer curve points than a completed one
            assert t["curve"] and t["kimg"] == t["curve"][-1][0]
            if t["status"] == "completed":
                assert [k for k, _ in t["curve"]] == pytest.approx([EVERY, TOTAL])
            else:
                assert t["kimg"] < TOTAL - 1e-9
        # the artifacts where users look: a table of trials and the plot (Prefect), child runs (MLflow)
        import mlflow

        uri = env["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)  # an earlier test in this process may have set another registry
        parent = mlflow.get_run(result["mlflow_run_id"])
        assert json.loads(parent.data.params["sweep.space"]) == {"train.progan.lr": {"grid": [0.003, 1e-6]},
                                                                 "train.seed": {"grid": [0, 1]}}
        children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.data.tags["ganforge.trial_id"] for c in children) == sorted(t["trial_id"] for t in trials)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        for c in children:
            t = next(t for t in trials if t["trial_id"] == c.data.tags["ganforge.trial_id"])
            hist = client.get_metric_history(c.info.run_id, "fid")
            assert [(h.step, round(h.value, 6)) for h in sorted(hist, key=lambda h: h.step)] == \
                [(round(k * 1000), round(v, 6)) for k, v in t["curve"]]
            assert c.data.params["train.progan.lr"] == str(t["train.progan.lr"]) and c.data.tags["status"] == t["status"]
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.png", "trials.csv",
                                                                                 "best-params.yaml"}
        assert result["registered"]["version"] == 1
        mv = client.get_model_version_by_alias("ganforge-progan", "challenger")
        assert mv.run_id == next(c.info.run_id for c in children
                                 if c.data.tags["ganforge.trial_id"] == trials[0]["trial_id"])

    # 3. the best params file reproduces the best trial's first-stage checkpoint exactly
    import torch

    best = yaml.safe_load((out / "best-params.yaml").read_text())
    assert best["train"]["progan"]["lr"] == trials[0]["train.progan.lr"] and best["train"]["seed"] == trials[0]["train.seed"]
    r = subprocess.run([str(BIN / "ganforge"), "-q", "train", "--params", str(out / "best-params.yaml"), "--set",
                        f"train.out={tmp_path / 'again'}"], cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    trial_summary = json.loads((Path(trials[0]["run_dir"]) / "summary.json").read_text())
    again_summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    stage = next(iter(trial_summary["stages"]))
    a = torch.load(Path(trial_summary["stages"][stage]["checkpoint"]) / "state.pt", weights_only=True)
    b = torch.load(Path(again_summary["stages"][stage]["checkpoint"]) / "state.pt", weights_only=True)
    for part in ("modules", "ema"):
        for m in a[part]:
            for k, v in a[part][m].items():
                assert torch.equal(v, b[part][m][k]), f"{part}.{m}.{k} differs"


def test_a_folder_of_another_sweep_or_other_params_is_refused(tmp_path):
    """Resuming needs the same sweep on the same params: finished trials would not compare otherwise."""
    from ganforge.models.families import get_family
    from ganforge.tasks.params import DataParams, load_params
    from ganforge.tasks.shard import shard
    from ganforge.tasks.sweep import sweep

    shard("synthetic:shapes:8", tmp_path / "shards", DataParams(resolution=8, workers=1), progress=False)
    out = tmp_path / "sw"
    space = parse_space(None, grid=["train.progan.lr=0.001,0.002"])
    p = load_params(None, {"data.shards": str(tmp_path / "shards"), "eval.every_kimg": 0.1})
    out.mkdir()
    asked = {"space": space, "num_samples": 1, "stages": 4, "metric": "fid", "mode": "min", "grace_kimg": 0.1,
             "reduction_factor": 2.0, "max_kimg": sum(s.kimg for s in get_family(p.train).stages()),
             "family": "progan", "seed": 0}
    base = p.model_dump(mode="json")
    (out / "sweep.json").write_text(json.dumps({"asked": {**asked, "num_samples": 3}, "base": base}))
    with pytest.raises(ParamsError, match="holds another sweep"):
        sweep(p, space, out)
    base["train"]["progan"]["r1_gamma"] = 1.0
    (out / "sweep.json").write_text(json.dumps({"asked": asked, "base": base}))
    with pytest.raises(ParamsError, match=r"holds this sweep with other params \(train.progan.r1_gamma differ\)"):
        sweep(p, space, out)
