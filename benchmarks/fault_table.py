"""Run the fault list of issue #13 against a tiny run, through the real `ganforge` CLI, and print a table:
fault -> outcome (recovered, or a clean error) -> exit code -> what was lost.

Usage: python benchmarks/fault_table.py [--keep]   (about 3-5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROWS: list[tuple[str, str, str, str]] = []


def ganforge(work: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    r = subprocess.run([str(BIN / "ganforge"), "-q", *args], cwd=work, env=env, capture_output=True, text=True,
                       timeout=900)
    if check and r.returncode != 0:
        raise SystemExit(f"setup step failed: ganforge {' '.join(args)}\n{r.stderr[-3000:]}")
    return r


def last_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("ganforge ")]
    tb = " (with a traceback!)" if "Traceback" in r.stderr else ""
    return (lines[-1][:150] if lines else (r.stderr.strip().splitlines() or ["-"])[-1][:150]) + tb


def row(fault: str, r: subprocess.CompletedProcess | None, outcome: str, lost: str) -> None:
    code = "-" if r is None else str(r.returncode)
    ROWS.append((fault, outcome if r is None or r.returncode == 0 else f"{outcome}: `{last_error(r)}`", code, lost))
    print(f"[{code:>3}] {fault}: {ROWS[-1][1]}", flush=True)


def newest_checkpoints(run: Path, stage: str) -> list[Path]:
    return sorted((run / "ray").glob(f"{stage}-*/ckpt-*"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ganforge-faults-"))
    params = {
        "data": {"source": "synthetic:shapes:96", "shards": "shards", "resolution": 8, "shard_size": 40,
                 "workers": 1},
        "train": {"family": "progan", "out": "run", "resolution": 8, "workers": 2, "batch_size": 16,
                  "checkpoint_kimg": 0.032, "log_every": 2, "max_failures": 0,
                  "progan": {"fmap_max": 16, "fmap_base": 64, "latent_dim": 16, "transition_kimg": 0.064,
                             "stabilize_kimg": 0.064}},
        "eval": {"num_samples": 16, "kid_subsets": 2, "workers": 1, "cache_dir": "cache"},
        "runtime": {"mlflow_tracking_uri": "sqlite:///mlflow.db", "mlflow_artifact_root": "art"},
    }
    import yaml

    (work / "params.yaml").write_text(yaml.safe_dump(params))
    print(f"work folder: {work}", flush=True)
    ganforge(work, "shard", check=True)
    ganforge(work, "train", check=True)
    final = json.loads((work / "run" / "summary.json").read_text())["final_checkpoint"]
    ganforge(work, "evaluate", "--checkpoint", final, "--out", "eval", check=True)
    ganforge(work, "register", "--checkpoint", final, "--evaluation", "eval/evaluation.json", check=True)

    # 2. shards
    def damaged_shards(name: str, fn) -> Path:
        d = work / name
        shutil.copytree(work / "shards", d)
        fn(d)
        return d

    def wrong_sha(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        m["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
        (d / "manifest.json").write_text(json.dumps(m))

    def truncate(d: Path, mid: bool) -> None:
        import tarfile

        p = d / "train-000000.tar"
        with tarfile.open(p) as tf:
            members = tf.getmembers()
        cut = members[5].offset_data + 7 if mid else members[10].offset
        p.write_bytes(p.read_bytes()[:cut] + (b"" if mid else b"\0" * 1024))

    def no_resolution(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        del m["resolution"]
        (d / "manifest.json").write_text(json.dumps(m))

    for fault, fn in (("a shard's sha256 in the manifest is wrong", wrong_sha),
                      ("a shard truncated at a sample boundary", lambda d: truncate(d, False)),
                      ("a shard truncated mid-sample", lambda d: truncate(d, True)),
                      ("manifest.json without `resolution`", no_resolution)):
        d = damaged_shards(f"shards-{len(ROWS)}", fn)
        t0 = time.perf_counter()
        r = ganforge(work, "train", "--data", str(d), "--out", f"run-{len(ROWS)}")
        row(f"{fault}, then `ganforge train`", r, f"refused before Ray started ({time.perf_counter() - t0:.1f} s)",
            "nothing")

    r = ganforge(work, "train", "--out", "run-batch", "--batch-size", "33")
    row("train.batch_size 33 with 2 workers", r, "refused before Ray started", "nothing")
    (work / "afile").write_text("x")
    r = ganforge(work, "shard", "--out", "afile/shards")
    row("`ganforge shard` into a path under a file", r, "clean error", "nothing")

    # 8. evaluate a random-bytes checkpoint: no reference statistics first
    bad = work / "bad-ckpt"
    shutil.copytree(final, bad)
    (bad / "state.pt").write_bytes(os.urandom(4096))
    shutil.rmtree(work / "cache", ignore_errors=True)
    r = ganforge(work, "evaluate", "--checkpoint", str(bad))
    row("`evaluate` of a random-bytes state.pt", r,
        f"refused before reference statistics (cache {'written' if (work / 'cache').exists() else 'untouched'})",
        "nothing")

    # registry
    r = ganforge(work, "promote", "--model", "ganforge-progan", "--version", "99")
    row("`promote --version 99`", r, "clean error", "nothing")
    r = ganforge(work, "sample", "--model", "models:/ganforge-progan@nosuchalias")
    row("`sample models:/...@nosuchalias`", r, "clean error", "nothing")
    ev = json.loads((work / "eval" / "evaluation.json").read_text())

    def variant(name: str, fid_delta: float, **kw) -> str:  # another evaluation of the same checkpoint
        e = {**ev, **kw, "scores": {**ev["scores"], "fid": ev["scores"]["fid"] + fid_delta}}
        (work / name).write_text(json.dumps(e))
        return name

    variant("eval-clean.json", -5.0, protocol="clean")
    ganforge(work, "register", "--checkpoint", final, "--evaluation", "eval-clean.json")
    r = ganforge(work, "promote", "--model", "ganforge-progan")
    row("`promote` of a challenger measured with another protocol", r, "refused (non-zero, decision printed)",
        "nothing")
    other = str(newest_checkpoints(work / "run", "progan-r0004")[-1])
    r = ganforge(work, "register", "--checkpoint", other, "--evaluation", "eval/evaluation.json")
    row("`register` with another checkpoint's evaluation.json", r, "refused", "nothing")
    ganforge(work, "register", "--checkpoint", other)  # no evaluation: no FID
    r = ganforge(work, "promote", "--model", "ganforge-progan", "--force")
    ganforge(work, "register", "--checkpoint", final, "--evaluation", variant("eval-2.json", +1.0))
    r = ganforge(work, "promote", "--model", "ganforge-progan")
    row("`--force` a version without FID, then promote a normal one", r,
        "promoted: a champion without FID does not block the gate" if r.returncode == 0 else "blocked", "nothing")

    # 3. two registers on a fresh store
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [str(BIN / "ganforge"), "-q", "register", "--checkpoint", final, "--evaluation", "eval/evaluation.json",
           "--set", "runtime.mlflow_tracking_uri=sqlite:///fresh.db", "--set", "registry.model_name=race"]
    procs = [subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes = [p.wait(600) for p in procs]
    row("two `register` at once on a fresh sqlite store", None,
        f"both succeeded (exit {codes[0]} and {codes[1]})" if codes == [0, 0] else f"exit codes {codes}", "nothing")

    # 10. kill -9 during shard, then shard again
    big = ["shard", "--source", "synthetic:shapes:40000", "--resolution", "64", "--out", "big", "--workers", "1"]
    p = subprocess.Popen([str(BIN / "ganforge"), "-q", *big], cwd=work, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(600):
        if list(work.glob(".big.tmp-*/train-*.tar")):
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    left = list(work.glob(".big.tmp-*"))
    size = sum(f.stat().st_size for d in left for f in d.rglob("*") if f.is_file())
    r = ganforge(work, "shard", "--source", "synthetic:shapes:8", "--resolution", "8", "--out", "big", "--workers", "1")
    row("`kill -9` of `ganforge shard`, then shard again", r,
        ("the dead run's tmp folder was removed" if not list(work.glob(".big.tmp-*")) else "leftovers remain")
        + f" ({len(left)} folder(s), {size / 1e6:.1f} MB)", "the killed run's partial shards")

    # 11. a credential in a URI
    r = ganforge(work, "train", "--out", "run-secret", "--set", "runtime.s3_endpoint_url=http://minio:hunter2@127.0.0.1:9",
                 "--set", "train.progan.stabilize_kimg=0.016", "--set", "train.resolution=4", "--workers", "1")
    leaked = "hunter2" in (work / "run-secret" / "summary.json").read_text() if (work / "run-secret" / "summary.json").exists() else None
    row("a password inside a URI param (summary.json)", r,
        "redacted" if leaked is False else f"LEAKED={leaked}", "nothing")

    # 1. (last: it damages the run) torn checkpoints: the stage's final checkpoint is damaged after the run
    for fault, damage in (("newest checkpoint's state.pt truncated", "truncate"),
                          ("newest checkpoint's meta.json missing", "meta")):
        ckpts = newest_checkpoints(work / "run", "progan-r0008")
        newest = ckpts[-1]
        if damage == "truncate":
            data = (newest / "state.pt").read_bytes()
            (newest / "state.pt").write_bytes(data[: len(data) // 2])
        else:
            (newest / "meta.json").unlink()
        r = ganforge(work, "train")
        rec = json.loads((work / "run" / "summary.json").read_text())["stages"]["progan-r0008"]
        resumed = rec.get("resumed_from")
        if r.returncode == 0 and resumed:
            start = json.loads((Path(resumed) / "meta.json").read_text())["images_in_stage"]
            row(f"{fault}, then `ganforge train`", r,
                f"recovered: skipped the damaged one(s) with a warning, resumed from {Path(resumed).name}",
                f"{rec['images_seen'] - start} of {rec['images_seen']} images retrained")
        else:
            row(f"{fault}, then `ganforge train`", r, "NOT recovered", "?")

    print("\n| fault | outcome | exit | lost |\n|---|---|---|---|")
    for f, o, c, lost in ROWS:
        print(f"| {f} | {o} | {c} | {lost} |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
