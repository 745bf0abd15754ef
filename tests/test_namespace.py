"""ganforge installs as one namespace (ganforge.flows / .tasks / .models): a user's project with its own
`models/` and `tasks/` packages neither shadows ganforge nor is shadowed by it, in the CLI and in Ray workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_cli_and_ray_workers_in_a_project_with_its_own_models_and_tasks(tmp_path):
    for pkg in ("models", "tasks", "flows"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"raise ImportError('the user\\'s own {pkg} package was imported')\n")
    bin_ = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    common = ["--set", f"data.shards={tmp_path / 'shards'}", "--set", f"train.out={tmp_path / 'run'}"]

    def run(*args):
        r = subprocess.run(["ganforge", "-q", *args, *common], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    run("shard", "--source", "synthetic:shapes:40", "--resolution", "8", "--workers", "1")
    out = run("train", "--family", "toyvae", "--resolution", "8", "--workers", "2", "--batch-size", "8",
              "--set", "train.toyvae.stages=1", "--set", "train.toyvae.stage_kimg=0.016", "--set", "train.toyvae.width=8")
    assert out["stages"]["toyvae-1"]["images_seen"] == 16
    # and the user's own packages are still theirs
    r = subprocess.run([sys.executable, "-c", "import models"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "the user's own models package was imported" in r.stderr
