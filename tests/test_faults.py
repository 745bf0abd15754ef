"""Faults and bad input (one test per finding): damaged checkpoints and shards are detected before use and
named in one line, resume falls back past a torn checkpoint, the CLI maps every expected failure to one line
and a distinct exit code, the gate is safe under concurrency and a forced champion does not block it, dead
runs' temporary folders are cleaned, and no credential of a URI is written out."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ganforge.models.family import StageSpec
from ganforge.tasks.checkpoint import checkpoint_problem, latest_checkpoint, load_state
from ganforge.tasks.errors import CheckpointError, InputError, ShardError, StageError, root_cause
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import DataParams, Params, ParamsError, TrainParams
from ganforge.tasks.shard import read_manifest, shard, verify_shards

BIN = Path(sys.executable).parent


def _toy(**kw) -> TrainParams:
    return TrainParams.model_validate(dict(family="toyvae", resolution=8, batch_size=8, checkpoint_kimg=0.016,
                                           grid_size=2, toyvae=dict(width=4, **kw)))


@pytest.fixture(scope="module")
def storage(tmp_path_factory, shards8) -> tuple[Path, list[str]]:
    """Ray-Train-like storage of one stage: <storage>/<stage>-<attempt>/ckpt-*, three checkpoints."""
    root = tmp_path_factory.mktemp("storage")
    s = LocalSession(root / "toyvae-1-attempt1")
    run_stage({"params": _toy().model_dump(mode="json"), "stage": 0, "shards": str(shards8), "run_dir": None,
               "max_steps": 6}, s)
    return root, s.checkpoints


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


STAGE = StageSpec("toyvae-1", 0, 8, 0.128)


# ----------------------------------------------------------------------------- 1. torn checkpoints


@pytest.mark.parametrize("damage", ["truncate state.pt", "delete meta.json", "legacy meta, truncated state.pt"])
def test_resume_skips_a_torn_newest_checkpoint(storage, tmp_path, caplog, damage):
    root, ckpts = storage
    st = _copy(root, tmp_path / "st")
    newest = st / "toyvae-1-attempt1" / Path(ckpts[-1]).name
    older = st / "toyvae-1-attempt1" / Path(ckpts[-2]).name
    state = newest / "state.pt"
    if damage == "delete meta.json":
        (newest / "meta.json").unlink()
    else:
        if damage.startswith("legacy"):  # written before meta.json recorded sizes: the archive itself is checked
            meta = json.loads((newest / "meta.json").read_text())
            meta.pop("files")
            (newest / "meta.json").write_text(json.dumps(meta))
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(newest) is not None and checkpoint_problem(older) is None
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(st), STAGE) == str(older)
    assert f"skipping checkpoint {newest}" in caplog.text
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is damaged: .*use an earlier checkpoint"):
        load_state(newest)


def test_a_full_check_catches_a_same_size_corruption(storage, tmp_path):
    root, ckpts = storage
    ck = _copy(Path(ckpts[-1]), tmp_path / "ck")
    data = bytearray((ck / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "state.pt").write_bytes(bytes(data))
    assert checkpoint_problem(ck) is None  # the cheap check sees the right size
    assert "sha256" in checkpoint_problem(ck, full=True)


def test_evaluate_and_register_refuse_a_damaged_checkpoint_before_any_work(storage, shards8, tmp_path):
    """Item 8 too: the checkpoint is validated before minutes of reference statistics."""
    from ganforge.tasks.evaluate import evaluate
    from ganforge.tasks.params import EvalParams
    from ganforge.tasks.registry import register

    ck = _copy(Path(storage[1][-1]), tmp_path / "ck")
    (ck / "state.pt").write_bytes(os.urandom(4096))  # random bytes: no longer a torch archive
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="is damaged"):
        evaluate(str(ck), shards8, EvalParams(num_samples=4, workers=1, cache_dir=str(cache)), progress=False)
    assert not cache.exists(), "no reference statistics were computed for a checkpoint that cannot load"
    p = Params.model_validate({"runtime": dict(mlflow_tracking_uri=f"sqlite:///{tmp_path}/m.db")})
    with pytest.raises(CheckpointError, match="is damaged"):
        register(str(ck), None, p, "run", data_sha256="x")


# ----------------------------------------------------------------------------- 2. shards


def _regen_hint(e) -> bool:
    return "regenerate" in str(e)


def test_a_wrong_sha256_in_the_manifest_is_refused(shards8, tmp_path):
    sh = _copy(shards8, tmp_path / "sh")
    m = json.loads((sh / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    (sh / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"train-000001.tar does not match its sha256") as e:
        verify_shards(sh)
    assert _regen_hint(e.value)
    verify_shards(sh, full=False)  # the cheap check (sizes, counts) cannot see it; --verify / small sets do


def _truncate_tar(path: Path, keep_samples: int | None = None, mid_sample: bool = False) -> None:
    import tarfile

    with tarfile.open(path) as tf:
        members = tf.getmembers()
    if mid_sample:
        cut = members[3].offset_data + 10  # inside a member's data
    else:
        keys = []
        for m in members:
            k = m.name.split(".")[0]
            if k not in keys:
                keys.append(k)
        first_dropped = keys[keep_samples]
        cut = next(m.offset for m in members if m.name.startswith(first_dropped + "."))
    data = path.read_bytes()[:cut]
    path.write_bytes(data + b"\0" * 1024 if not mid_sample else data)  # a clean end of archive, or a torn one


@pytest.mark.parametrize("mid_sample", [False, True], ids=["at a sample boundary", "mid-sample"])
def test_a_truncated_shard_is_refused_before_and_while_reading(shards8, tmp_path, mid_sample):
    from ganforge.tasks.data import iter_split

    sh = _copy(shards8, tmp_path / "sh")
    _truncate_tar(sh / "train-000000.tar", keep_samples=7, mid_sample=mid_sample)
    with pytest.raises(ShardError, match="train-000000.tar") as e:
        verify_shards(sh, full=False)
    assert _regen_hint(e.value)
    with pytest.raises(ShardError, match="train-000000.tar"):  # the reader itself never returns fewer samples
        for _ in iter_split(sh, "train", 8):
            pass


def test_a_manifest_without_resolution_names_its_file(shards8, tmp_path):
    sh = _copy(shards8, tmp_path / "sh")
    m = json.loads((sh / "manifest.json").read_text())
    del m["resolution"]
    (sh / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"manifest.json lacks resolution"):
        read_manifest(sh)
    (sh / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest.json is not valid JSON"):
        read_manifest(sh)


# ----------------------------------------------------------------------------- 4. errors that hid their cause


def test_checks_before_ray_starts(shards8, tmp_path):
    import ray

    from ganforge.tasks.train import train_stage

    ray.shutdown()
    p = Params.model_validate({"train": dict(family="toyvae", resolution=8, batch_size=33, workers=2,
                                             out=str(tmp_path / "run"), toyvae=dict(width=4))})
    with pytest.raises(ParamsError, match=r"train.batch_size \(33\) must be divisible by train.workers \(2\)"):
        train_stage(shards8, p.train.out, p, 0)
    assert not ray.is_initialized(), "refused before any Ray job started"


def test_the_root_cause_of_a_worker_failure_is_surfaced():
    from ray.train import WorkerGroupError

    from ganforge.tasks.errors import one_line

    bad = ShardError("/data/train-000003.tar holds 300 samples, the manifest lists 617")
    err = WorkerGroupError("...hundreds of lines...", {1: RuntimeError("rank 1 lost"), 0: bad})
    cause = root_cause(err)
    assert cause is bad and one_line(cause).startswith("ShardError: /data/train-000003.tar holds 300")
    wrapped = StageError("stage x failed", cause)
    assert wrapped.exit_code == 4 and not wrapped.retryable  # fails at once, not after retries
    crash = StageError("stage x failed", RuntimeError("node lost"))
    assert crash.exit_code == 1 and crash.retryable


# ----------------------------------------------------------------------------- 5/6. one line, distinct exit codes


def _cli(*args, cwd):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "ganforge"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("ganforge ")]
    assert lines, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[-1]


def test_cli_failures_are_one_line_with_distinct_exit_codes(storage, shards8, tmp_path):
    ck = _copy(Path(storage[1][-1]), tmp_path / "ck")
    (ck / "state.pt").write_bytes(os.urandom(2048))
    r = _cli("-q", "evaluate", "--checkpoint", str(ck), "--data", str(shards8), cwd=tmp_path)
    assert r.returncode == 4 and "is damaged" in _one_line(r) and str(ck) in _one_line(r)

    sh = _copy(shards8, tmp_path / "sh")
    m = json.loads((sh / "manifest.json").read_text())
    del m["resolution"]
    (sh / "manifest.json").write_text(json.dumps(m))
    r = _cli("-q", "train", "--data", str(sh), "--family", "toyvae", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 4 and "manifest.json lacks resolution" in _one_line(r)

    db = f"sqlite:///{tmp_path}/m.db"
    r = _cli("-q", "promote", "--model", "nosuch", "--version", "99", "--set", f"runtime.mlflow_tracking_uri={db}",
             cwd=tmp_path)
    assert r.returncode == 5 and "registered model nosuch has no version 99" in _one_line(r)
    r = _cli("-q", "sample", "--model", "models:/nosuch@nosuchalias", "--set", f"runtime.mlflow_tracking_uri={db}",
             cwd=tmp_path)
    assert r.returncode == 5 and "models:/nosuch@nosuchalias" in _one_line(r)

    r = _cli("-q", "train", "--set", "train.batch_size=0", cwd=tmp_path)
    assert r.returncode == 2


def test_failure_mapping():
    from ganforge.flows.cli import failure

    assert failure(PermissionError(13, "Permission denied", "/ro/shards"))[0] == 6
    assert "/ro/shards" in failure(PermissionError(13, "Permission denied", "/ro/shards"))[1]
    assert failure(FileNotFoundError(2, "No such file", "/x/state.pt")) == (4, "not found: /x/state.pt")
    assert failure(CheckpointError("checkpoint c is damaged"))[0] == 4
    assert failure(KeyError("resolution"))[0] == 1
    code, line = failure(ZeroDivisionError("boom"))
    assert code == 1 and line.startswith("unexpected ZeroDivisionError: boom")


# ----------------------------------------------------------------------------- 3/6/7/9. the registry and the gate


@pytest.fixture
def registry_run(storage, shards8, tmp_path):
    from ganforge.tasks.registry import start_pipeline_run

    p = Params.model_validate({
        "data": {"shards": str(shards8)}, "registry": {"model_name": "faults-gen"},
        "runtime": dict(mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_artifact_root=str(tmp_path / "a"))})
    return p, storage[1][-1], start_pipeline_run(p, shards8, "faults")


def _ev(ckpt, fid, protocol="tf1"):
    return {"checkpoint": ckpt, "fid": fid, "protocol": protocol, "num_samples": 10, "scores": {"fid": fid},
            "reference": {"manifest_sha256": "m", "split": "val", "count": 4}}


def test_every_refusal_exits_nonzero(registry_run, tmp_path):
    from ganforge.tasks.registry import register

    p, ck, run_id = registry_run
    register(ck, _ev(ck, 30.0), p, run_id, data_sha256="x")
    v2 = register(ck, _ev(ck, 10.0, protocol="clean"), p, run_id, data_sha256="x")
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump(mode="json")))
    r = _cli("-q", "promote", "--version", "1", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["promoted"]
    r = _cli("-q", "promote", "--version", str(v2["version"]), "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert r.returncode == 3 and "not comparable" in _one_line(r)  # a protocol mismatch used to exit 0
    assert json.loads(r.stdout.strip().splitlines()[-1])["promoted"] is False


def test_a_forced_champion_without_fid_does_not_block_the_gate(registry_run):
    from ganforge.tasks.registry import promote, register

    p, ck, run_id = registry_run
    v1 = register(ck, None, p, run_id, data_sha256="x")
    assert promote("faults-gen", v1["version"], p, force=True)["promoted"]
    v2 = register(ck, _ev(ck, 25.0), p, run_id, data_sha256="x")
    d = promote("faults-gen", v2["version"], p)
    assert d["promoted"] and "has no FID: the first version with one takes over" in d["reason"]
    v3 = register(ck, _ev(ck, 26.0), p, run_id, data_sha256="x")
    assert not promote("faults-gen", v3["version"], p)["promoted"]  # and from then on the gate compares


def test_register_refuses_another_checkpoints_evaluation(registry_run, storage, tmp_path):
    from ganforge.tasks.registry import register

    p, ck, run_id = registry_run
    other = storage[1][0]
    with pytest.raises(InputError, match=f"the evaluation was made for checkpoint {other}"):
        register(ck, _ev(other, 5.0), p, run_id, data_sha256="x")
    copy = _copy(Path(ck), tmp_path / "exported")  # the same checkpoint elsewhere (e.g. RUN_DIR/stages) is fine
    assert register(str(copy), _ev(ck, 5.0), p, run_id, data_sha256="x")["version"] >= 1


def _promote_in_process(args):
    params_json, version, q = args
    from ganforge.tasks.registry import promote

    p = Params.model_validate_json(params_json)
    q.put(promote("race-gen", version, p)["promoted"])


@pytest.mark.parametrize("order", ["better first", "worse first"])
def test_concurrent_promotions_keep_the_best_champion(registry_run, order):
    """Two gates deciding at once: without the lock both read the same champion and the later alias write wins,
    which can make the worse model champion."""
    from ganforge.tasks.registry import promote, register

    p, ck, run_id = registry_run
    p = Params.model_validate({**p.model_dump(mode="json"), "registry": {"model_name": "race-gen"}})
    base = register(ck, _ev(ck, 30.0), p, run_id, data_sha256="x")
    assert promote("race-gen", base["version"], p)["promoted"]
    better = register(ck, _ev(ck, 10.0), p, run_id, data_sha256="x")["version"]
    worse = register(ck, _ev(ck, 20.0), p, run_id, data_sha256="x")["version"]
    versions = [better, worse] if order == "better first" else [worse, better]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=((p.model_dump_json(), v, q),)) for v in versions]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(240)
    assert all(pr.exitcode == 0 for pr in procs)
    from mlflow import MlflowClient

    assert int(MlflowClient().get_model_version_by_alias("race-gen", "champion").version) == better
    assert not any(m.name.endswith(".gate-lock") for m in MlflowClient().search_registered_models())


def test_first_use_of_a_fresh_sqlite_store_by_two_processes(storage, shards8, tmp_path):
    """Two `ganforge register` started together on a fresh store: both succeed (one used to fail with
    `table experiments already exists`)."""
    ck = storage[1][-1]
    db = f"sqlite:///{tmp_path}/fresh.db"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [str(BIN / "ganforge"), "-q", "register", "--checkpoint", ck, "--data", str(shards8),
           "--set", f"runtime.mlflow_tracking_uri={db}", "--set", f"runtime.mlflow_artifact_root={tmp_path}/art"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [pr.communicate(timeout=600) for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert sorted(json.loads(o[0].strip().splitlines()[-1])["version"] for o in outs) == [1, 2]


# ----------------------------------------------------------------------------- 10. leftovers, 11. secrets


def test_dead_runs_leftovers_are_cleaned(tmp_path):
    import socket

    host = socket.gethostname().replace("-", "_")
    out = tmp_path / "shards"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = [tmp_path / f".shards.tmp-{host}-{dead}-deadbeef", tmp_path / f".shards.old-{host}-{dead}-0badf00d"]
    live = tmp_path / f".shards.tmp-{host}-{os.getpid()}-abcdef12"  # a running owner's: kept
    for d in (*stale, live):
        d.mkdir()
        (d / "junk.tar").write_bytes(b"x" * 1000)
    shard("synthetic:shapes:8", out, DataParams(resolution=8, workers=1, val_fraction=0.25), progress=False)
    assert not any(d.exists() for d in stale) and live.exists()
    assert (out / "manifest.json").exists()


def test_credentials_are_redacted_wherever_ganforge_writes_a_uri(shards8, tmp_path, restore_environ):
    import mlflow

    from ganforge.tasks.secrets import redact
    from ganforge.tasks.registry import start_pipeline_run
    from ganforge.tasks.train import _open_run

    assert redact("postgresql://ganforge:s3cr3t@db:5432/mlflow") == "postgresql://ganforge:***@db:5432/mlflow"
    assert redact({"a": ["http://u:p@h/x", "sqlite:///m.db"]}) == {"a": ["http://u:***@h/x", "sqlite:///m.db"]}
    p = Params.model_validate({
        "train": dict(family="toyvae", resolution=8, out=str(tmp_path / "run")),
        "runtime": dict(mlflow_tracking_uri=f"sqlite:///{tmp_path}/m.db", mlflow_artifact_root=str(tmp_path / "a"),
                        s3_endpoint_url="http://minio:hunter2@127.0.0.1:9", ray_address="ray://admin:pw@head:10001")})
    run_id = start_pipeline_run(p, shards8, "secrets")
    logged = mlflow.get_run(run_id).data.params
    assert logged["runtime.s3_endpoint_url"] == "http://minio:***@127.0.0.1:9"
    assert not any("hunter2" in v or ":pw@" in v for v in logged.values())
    _, summary, _ = _open_run(shards8, p.train.out, p)
    assert "hunter2" not in json.dumps(summary) and ":pw@" not in json.dumps(summary)


@pytest.fixture
def tracking_server(tmp_path):
    """A real MLflow tracking server on loopback (sqlite behind it, artifacts proxied)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-art"), "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_concurrent_promotions_on_a_tracking_server(storage, shards8, tracking_server):
    """The gate's lock is the registry's own unique name, so it holds on a tracking server as on sqlite."""
    from ganforge.tasks.registry import promote, register, start_pipeline_run

    ck = storage[1][-1]
    p = Params.model_validate({"data": {"shards": str(shards8)}, "registry": {"model_name": "race-gen"},
                               "runtime": {"mlflow_tracking_uri": tracking_server}})
    run_id = start_pipeline_run(p, shards8, "server")
    assert promote("race-gen", register(ck, _ev(ck, 30.0), p, run_id, data_sha256="x")["version"], p)["promoted"]
    worse = register(ck, _ev(ck, 20.0), p, run_id, data_sha256="x")["version"]
    better = register(ck, _ev(ck, 10.0), p, run_id, data_sha256="x")["version"]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=((p.model_dump_json(), v, q),)) for v in (worse, better)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(240)
    assert all(pr.exitcode == 0 for pr in procs)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    assert int(client.get_model_version_by_alias("race-gen", "champion").version) == better


def _gate_cycles(uri: str, n: int, log: str, art: str, q) -> None:
    """In a fresh process: set MLflow up as the CLI does (first use of the store included), then take and release
    the champion gate's lock ``n`` times, writing when it enters and leaves."""
    import time

    from mlflow import MlflowClient

    from ganforge.tasks.params import RuntimeParams
    from ganforge.tasks.registry import gate_lock, setup_mlflow

    errors = []
    try:
        setup_mlflow(RuntimeParams(mlflow_tracking_uri=uri, mlflow_artifact_root=art))
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for _ in range(n):
            try:
                with gate_lock(client, "race-gen"):
                    with open(log, "a") as f:
                        f.write("in\n")
                    time.sleep(0.005)
                    with open(log, "a") as f:
                        f.write("out\n")
            except Exception as e:  # noqa: BLE001 - collected and reported by the test
                errors.append(repr(e)[:300])
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e)[:300])
    q.put(errors)


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_the_gate_lock_holds_for_fifty_cycles_of_two_processes(store, tmp_path, request):
    """Two processes on a fresh store take the gate 25 times each: no failure (one in 8 pairs of `register` once
    lost its lock: `...gate-lock not found`), never both inside, no lock left behind."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/fresh.db" if store == "sqlite" else request.getfixturevalue("tracking_server")
    log = tmp_path / "gate.log"
    log.touch()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gate_cycles, args=(uri, 25, str(log), str(tmp_path / "art"), q)) for _ in range(2)]
    for p in procs:
        p.start()
    errors = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    assert errors == [[], []]
    depth, worst = 0, 0
    for line in log.read_text().split():
        depth += 1 if line == "in" else -1
        worst = max(worst, depth)
    assert worst == 1 and log.read_text().count("in\n") == 50
    assert not [m.name for m in MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
                if m.name.endswith(".gate-lock")]
