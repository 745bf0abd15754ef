"""What a user sees and runs: the terminal output of a tiny `ganforge train` and `ganforge pipeline` (a live
progress display and one line per stage; no httpx lines, no Ray Train report lines, no MLflow warnings we
cause), and every README example marked runnable, run unchanged in that user's folder against the model it
registered. Every fenced bash/python block of README.md carries a marker, so a new example is either run here
or says why it is not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# one xdist worker builds the user's folder (a train and a pipeline run) and runs every example in it
pytestmark = pytest.mark.xdist_group("readme")

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- readme-test: (run|skip: .+?) -->")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
BIN = Path(sys.executable).parent


def readme_blocks() -> list[tuple[int, str, str, str]]:
    """(line, language, marker, code) of every fenced bash/python block."""
    text = (ROOT / "README.md").read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1)
        if lang not in ("bash", "python"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(before.strip())
        out.append((line, lang, mark.group(1) if mark else "", m.group(2)))
    return out


def test_every_readme_example_is_marked():
    blocks = readme_blocks()
    assert len(blocks) > 10
    unmarked = [line for line, _, mark, _ in blocks if not mark]
    assert not unmarked, f"README.md blocks at lines {unmarked} need <!-- readme-test: run --> or <!-- readme-test: skip: why -->"
    assert sum(mark == "run" for _, _, mark, _ in blocks) >= 3


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "120"}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "PREFECT_API_URL", "GANFORGE_VERBOSE"):
        env.pop(k, None)  # the user's folder decides
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's folder after `ganforge train` and `ganforge pipeline` with a tiny params.yaml (ProGAN 4→8 on
    synthetic shapes; MLflow in ./mlflow.db as by default): (folder, train output, pipeline output)."""
    d = tmp_path_factory.mktemp("user")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source="synthetic:shapes:64", resolution=8, workers=1)
    p["train"].update(resolution=8, batch_size=16, checkpoint_kimg=1.0, log_every=1, workers=1)
    p["train"]["progan"].update(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.032, stabilize_kimg=0.032)
    p["eval"].update(num_samples=16, kid_subsets=3, workers=1)
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    _run(["ganforge", "-q", "shard"], d)
    train = _run(["ganforge", "train"], d)
    pipeline = _run(["ganforge", "pipeline"], d)
    return d, train, pipeline


CHATTER = ("httpx", "HTTP Request:", "TrainingReport(", "Reporting training result", "cloudpickle", "CloudPickle",
           "Add type hints", "integer column", "RayTrainWorker pid", "TrainController pid")


@pytest.mark.slow
def test_train_and_pipeline_show_progress_not_chatter(user_dir):
    d, train, pipeline = user_dir
    for out in (train, pipeline):
        for noise in CHATTER:
            assert noise not in out, f"{noise!r} in:\n{out[-3000:]}"
    # a live display per stage (stage, resolution, kimg done / total), then one line per finished stage
    for stage, res, kimg in (("progan-r0004", 4, 0.032), ("progan-r0008", 8, 0.064)):
        assert re.search(rf"{stage} {res}px: 100%.*{kimg:.3f}/{kimg:.3f} kimg", train), train[-3000:]
        assert re.search(rf"stage {stage} done: {kimg:.3f} kimg", train), train[-3000:]
        assert re.search(rf"stage {stage} already finished: {kimg:.3f} kimg", pipeline), pipeline[-3000:]
    assert f"worker logs: {d / 'runs/demo/logs'}" in train
    assert any(p.name.startswith("progan-r0008.rank0") for p in (d / "runs/demo/logs").iterdir())
    # feature extraction counts images; the final summary as before
    assert re.search(r"features \w+: 100%.*\b16/16 ", pipeline), pipeline[-3000:]
    assert "== ganforge pipeline done ==" in pipeline and "version 1 (champion" in pipeline


@pytest.mark.slow
@pytest.mark.parametrize("line,lang,code", [(ln, lang, code) for ln, lang, mark, code in readme_blocks()
                                            if mark == "run"])
def test_readme_example_runs(user_dir, line, lang, code):
    d, _, _ = user_dir
    if lang == "bash":
        _run(["bash", "-euo", "pipefail", "-c", code], d)
    else:
        out = _run([sys.executable, "-c", code], d)
        assert "Warning" not in out, out[-3000:]  # e.g. MLflow's notice about unpickling code
