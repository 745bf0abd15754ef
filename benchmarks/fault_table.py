"""Run the fault lists of issues #13 and #29 against a tiny run, through the real `ganforge` CLI, and print a
table: fault -> outcome (recovered, or a clean error) -> exit code -> what was lost.

Usage: python benchmarks/fault_table.py [--keep]   (about 6-8 minutes on 2 CPU cores)
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
    r = ganforge(work, "train", "--out", "run-secret", "--set", "runtime.mlflow_tracking_uri=postgresql://minio:hunter2@db/m",
                 "--set", "train.progan.stabilize_kimg=0.016", "--set", "train.resolution=4", "--workers", "1")
    leaked = "hunter2" in (work / "run-secret" / "summary.json").read_text() if (work / "run-secret" / "summary.json").exists() else None
    row("a password inside a URI param (summary.json)", r,
        "redacted" if leaked is False else f"LEAKED={leaked}", "nothing")

    round_two(work, env)

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


PEAK = ("import re, sys\nfrom ganforge.flows.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
        "    hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "    print('PEAK', int(hwm) / 1024, file=sys.stderr)\nsys.exit(code)\n")


def peak_child_mib(args: list[str], work: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """``ganforge ARGS`` in a fresh interpreter, and its peak resident memory in MiB (VmHWM, which starts afresh
    at exec; decode workers, when there are any, are not counted)."""
    r = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=work, env=env, capture_output=True, text=True,
                       timeout=900)
    peak = [float(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("PEAK ")]
    return r, (peak[0] if peak else float("nan"))


def round_two(work: Path, env: dict) -> None:
    """Issue #29: one run per folder, hostile input, secrets, failing early, the exit contract, leftovers."""
    import zipfile

    import numpy as np
    from PIL import Image

    # 0. Prefect's local server on a fresh home, with both cores kept busy
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "from ganforge.flows.services import ensure_prefect_api as e; e()"],
                           cwd=work, env={**{k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                                          "PREFECT_HOME": str(work / "prefect-home")},
                           capture_output=True, text=True, timeout=600)
        row("Prefect's local server, fresh PREFECT_HOME, cores kept busy (Prefect waits 20 s)", r,
            f"started in {time.perf_counter() - t0:.0f} s", "nothing")
    finally:
        for p in spin:
            p.kill()

    # 1. two runs on one folder; the holder killed; the next run takes over
    busy = ["train", "--out", "run-busy", "--workers", "1"]
    holder = subprocess.Popen([str(BIN / "ganforge"), "-q", *busy], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(1200):
        if (work / ".run-busy.lock").exists():
            break
        time.sleep(0.1)
    r = ganforge(work, *busy)
    row("two `ganforge train` on one --out at once", r, "the second refused, naming the first", "nothing")
    for _ in range(1200):  # the holder is killed once it has a checkpoint
        if list((work / "run-busy").glob("ray/*/ckpt-*")) or holder.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    r = ganforge(work, *busy)
    recs = json.loads((work / "run-busy" / "summary.json").read_text())["stages"] if r.returncode == 0 else {}
    resumed = [k for k, v in recs.items() if v.get("resumed_from")]
    row("`kill -9` of that train, then train again", r,
        "took the folder over" + (f", resumed {resumed[0]} from its checkpoint" if resumed else ""),
        "the images since its last checkpoint")
    big = ["shard", "--source", "synthetic:shapes:40000", "--resolution", "64", "--out", "held", "--workers", "2"]
    holder = subprocess.Popen([str(BIN / "ganforge"), "-q", *big], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(600):
        if (work / ".held.lock").exists():
            break
        time.sleep(0.05)
    r = ganforge(work, "shard", "--source", "synthetic:shapes:8", "--resolution", "8", "--out", "held")
    row("two `ganforge shard` into one --out at once", r, "the second refused, naming the first", "nothing")
    time.sleep(2)
    kids = [int(c) for t in Path(f"/proc/{holder.pid}/task").glob("*") for c in (t / "children").read_text().split()]
    holder.kill()
    holder.wait()
    time.sleep(5)
    alive = [k for k in kids if Path(f"/proc/{k}").exists()
             and Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"]
    row("`kill -9` of `ganforge shard` with 2 decode workers", None,
        f"{len(kids) - len(alive)} of {len(kids)} workers ended with it" + (f"; {len(alive)} LEFT" if alive else ""),
        "the partial shards (removed by the next run)")

    # 2. hostile input (each in a fresh process: its own peak memory)
    src = work / "hostile"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / f"ok{i}.png")
    zpath = work / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.write(src / f"ok{i}.png", f"ok{i}.png")
        with zf.open("huge.png", "w", force_zip64=True) as m:
            for _ in range(1024):
                m.write(bytes(1 << 20))
    r, peak = peak_child_mib(["-q", "shard", "--source", str(zpath), "--out", "zb", "--resolution", "8",
                              "--workers", "1"], work, env)
    row(f"a {zpath.stat().st_size / 1e6:.1f} MB .zip holding a 1 GiB member", r,
        f"member skipped unread, peak {peak:.0f} MiB", "nothing")
    with open(src / "huge.png", "wb") as f:
        f.truncate(1 << 30)
    (src / "out.png").symlink_to(work / "params.yaml")
    (src / "gone.png").symlink_to(work / "no-such.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).save(src / "dot.png")
    Image.fromarray(rng.integers(0, 255, (100, 8000, 3), dtype=np.uint8)).save(src / "strip.png")
    r, peak = peak_child_mib(["-q", "shard", "--source", str(src), "--out", "hs", "--resolution", "8",
                              "--workers", "1"], work, env)
    m = json.loads((work / "hs" / "manifest.json").read_text()) if r.returncode == 0 else {"skipped": []}
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    row("a 1 GiB file in a source folder", r, f"{reasons.get('huge.png', 'NOT skipped')}; peak {peak:.0f} MiB",
        "nothing")
    row("a link out of the source folder, and a dangling link", r,
        f"listed as skipped: {reasons.get('out.png', 'FOLLOWED')}; {reasons.get('gone.png', 'not listed')}", "nothing")
    row("a 1x1 image, and an 8000x100 one", r, f"{reasons.get('dot.png', 'upscaled')}; "
        f"{m.get('extreme_aspect', {}).get('count', 0)} extreme aspect(s) in the manifest and a warning", "nothing")

    # 3. secrets
    r = ganforge(work, "train", "--out", "run-secret2", "--set", "train.resolution=4", "--workers", "1",
                 "--set", "train.progan.stabilize_kimg=0.016",
                 "--set", "runtime.mlflow_tracking_uri=postgresql://u:p@ss/w0rd@db/m?password=hunter2")
    r2 = subprocess.run([str(BIN / "ganforge"), "dvc-stages", "--file", "x.yaml"], cwd=work, capture_output=True,
                        text=True, env={**env, "PREFECT_API_URL": "http://admin:p@ss/w0rd@127.0.0.1:9/api"})
    summary = work / "run-secret2" / "summary.json"
    text = (summary.read_text() if summary.exists() else "") + r.stderr + r2.stderr
    row("`?password=` and a password with a raw @ and / (logs, summary.json)", r2,
        ("redacted" if "hunter2" not in text and "w0rd" not in text else "LEAKED")
        + (" (logs and summary.json)" if summary.exists() else " (logs; no summary.json was written!)"), "nothing")

    # 5. failing early, the exit contract
    t0 = time.perf_counter()
    r = ganforge(work, "pipeline", "--set", "runtime.mlflow_tracking_uri=http://127.0.0.1:9",
                 "--set", "train.out=run-nomlflow")
    row("`pipeline` with an unreachable MLflow tracking server", r,
        f"refused before training ({time.perf_counter() - t0:.0f} s)", "nothing")
    r = ganforge(work, "train", "--batch-size", "32")
    row("resume with changed params (batch size 16 -> 32)", r, "refused, naming the key", "nothing")
    bad = work / "bad-ckpt2"
    final = json.loads((work / "run" / "summary.json").read_text())["final_checkpoint"]
    shutil.copytree(final, bad)
    import datetime

    import torch

    torch.save({"when": datetime.datetime(2026, 1, 1)}, bad / "state.pt")
    meta = json.loads((bad / "meta.json").read_text())
    meta["files"]["state.pt"]["size"] = (bad / "state.pt").stat().st_size
    (bad / "meta.json").write_text(json.dumps(meta))
    r = ganforge(work, "evaluate", "--checkpoint", str(bad))
    row("a damaged state.pt of the recorded size", r,
        "called damaged" + (" (suggests weights_only=False!)" if "weights_only" in r.stderr else ""), "nothing")
    (work / "p5.yaml").write_text("data: 5\n")
    r = ganforge(work, "shard", "--params", "p5.yaml")
    row("`data: 5` in params.yaml", r, "refused, naming the section", "nothing")
    ro = work / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        try:
            r = ganforge(work, "shard", "--out", str(ro / "shards"))
            row("`shard` onto a read-only file system", r, "refused", "nothing")
        finally:
            subprocess.run(["umount", str(ro)])
    # Ctrl-C: SIGINT to the whole foreground group, as a terminal sends it
    p = subprocess.Popen([str(BIN / "ganforge"), "-q", "train", "--out", "run-int", "--workers", "1",
                          "--set", "train.progan.stabilize_kimg=20"], cwd=work, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(1200):
        if list((work / "run-int").glob("ray/*/ckpt-*")):
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    after = err[err.find("interrupted;"):].strip().splitlines()[1:] if "interrupted;" in err else []
    row("Ctrl-C during `ganforge train`", r,
        f"interrupted; {len(after)} line(s) after the one line"
        + (" (Ray's 'Unhandled error' traceback)" if "Unhandled error" in err or "Traceback" in err else ""),
        "the images since its last checkpoint")


if __name__ == "__main__":
    main()
