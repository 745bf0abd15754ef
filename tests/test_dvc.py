"""Real DVC in a temp git repo: `dvc repro` end to end on tiny data (ProGAN's and VQ-GAN's stages), the
no-op re-run, and a selective re-run after an eval param change (only evaluate and register run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_dvc_repro_noop_and_selective(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / f, repo / f)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source="synthetic:shapes:48", workers=1)
    p["train"].update(batch_size=16, checkpoint_kimg=1.0, log_every=2)
    p["train"]["progan"].update(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.032, stabilize_kimg=0.032)
    p["train"]["vqgan"].update(ch=8, ch_mult=[1, 2, 2], z_channels=8, embed_dim=8, n_embed=16, disc_start=2, disc_ch=8,
                               n_layer=1, n_head=2, n_embd=16, autoencoder_kimg=0.032, prior_kimg=0.032, token_workers=1)
    p["eval"].update(num_samples=8, kid_subsets=3, workers=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    out = _run(["dvc", "repro"], repo, env)
    for stage in ("shard", "train_r0004", "train_r0032", "evaluate", "register", "vqgan_autoencoder", "vqgan_tokens",
                  "vqgan_prior", "vqgan_evaluate", "vqgan_register"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "runs/demo/eval/metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["protocol"] == "tf1" and metrics["num_samples"] == 8
    reg = json.loads((repo / "runs/demo/registered.json").read_text().strip().splitlines()[-1])
    assert reg["version"] == 1 and reg["promotion"]["promoted"]
    assert (repo / "runs/demo/stages/progan-r0032/state.pt").exists()
    vq = json.loads((repo / "runs/vqgan/eval/metrics.json").read_text())
    assert vq["fid"] > 0 and vq["rfid"] > 0 and 0 < vq["codebook_usage"] <= 1
    vreg = json.loads((repo / "runs/vqgan/registered.json").read_text().strip().splitlines()[-1])
    assert vreg["name"] == "ganforge-vqgan" and vreg["version"] == 1
    assert json.loads((repo / "runs/vqgan/tokens/manifest.json").read_text())["grid"] == [8, 8]
    assert "Data and pipelines are up to date" in _run(["dvc", "repro"], repo, env)
    assert "fid" in _run(["dvc", "metrics", "show"], repo, env)
    p["eval"]["num_samples"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == ["evaluate", "register", "vqgan_evaluate", "vqgan_register"], out
    assert json.loads((repo / "runs/demo/eval/metrics.json").read_text())["num_samples"] == 10
