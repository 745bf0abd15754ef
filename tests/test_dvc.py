"""Real DVC in a temp git repo: `dvc repro` end to end on tiny data, one pipeline per kind of family (ProGAN's
chained stages, VQ-GAN's autoencoder → tokens (a prepare stage) → prior, and the test-only toyvae family's
stage; CycleGAN, a single-stage GAN on two domains, in its own repo; every other family's stages are the same
`train` entries of the same generic code), all from the one generic dvc.yaml iterating `ganforge dvc-stages`), the no-op re-run,
and a selective re-run after an eval param change (only evaluate and register run); the committed stage list
matches params.yaml, and a stale one is refused."""

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


def _repo(tmp_path: Path, p: dict) -> tuple[Path, dict]:
    """A git repo with what `git clone` brings (dvc.yaml and the committed DVC project files: .dvc/config,
    .dvc/.gitignore, .dvcignore, so `dvc repro` works without `dvc init`) and params ``p``; and the environment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / f).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], repo, env)
    return repo, env


def test_dvc_repro_noop_and_selective(tmp_path):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source="synthetic:shapes:48", workers=1, resolution=8)
    p["train"].update(batch_size=16, checkpoint_kimg=1.0, log_every=2, resolution=8, workers=1)
    p["train"]["progan"].update(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.032, stabilize_kimg=0.032)
    p["train"]["toyvae"] = dict(stage_kimg=0.032, width=8, stages=1)
    p["train"]["vqgan"].update(ch=8, ch_mult=[1, 2], z_channels=8, embed_dim=8, n_embed=16, disc_start=2, disc_ch=8,
                               disc_layers=1, n_layer=1, n_head=2, n_embd=16, autoencoder_kimg=0.032, prior_kimg=0.032, token_workers=1)
    p["eval"].update(num_samples=8, kid_subsets=3, workers=1)
    repo, env = _repo(tmp_path, p)
    # the toy family lives in tests/plugins (an entry point, as a user's package): no edit of ganforge or dvc.yaml
    _run(["ganforge", "-q", "dvc-stages", "--pipeline", "demo=progan:runs/demo", "--pipeline", "vqgan=vqgan:runs/vqgan",
          "--pipeline", "toy=toyvae:runs/toy"], repo, env)
    out = _run(["dvc", "repro"], repo, env)
    for stage in ("shard", "train@demo-progan-r0004", "train@demo-progan-r0008", "evaluate@demo", "register@demo",
                  "train@vqgan-vqgan-1-autoencoder", "prepare@vqgan-vqgan-2-tokens", "train@vqgan-vqgan-3-prior",
                  "evaluate@vqgan", "register@vqgan", "train@toy-toyvae-1", "evaluate@toy",
                  "register@toy"):
        assert f"Running stage '{stage}'" in out, stage
    metrics = json.loads((repo / "runs/demo/eval/metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["protocol"] == "tf1" and metrics["num_samples"] == 8
    reg = json.loads((repo / "runs/demo/registered.json").read_text().strip().splitlines()[-1])
    assert reg["version"] == 1 and reg["promotion"]["promoted"]
    assert (repo / "runs/demo/stages/progan-r0008/state.pt").exists()
    vq = json.loads((repo / "runs/vqgan/eval/metrics.json").read_text())
    assert vq["fid"] > 0 and vq["rfid"] > 0 and 0 < vq["codebook_usage"] <= 1
    vreg = json.loads((repo / "runs/vqgan/registered.json").read_text().strip().splitlines()[-1])
    assert vreg["name"] == "ganforge-vqgan" and vreg["version"] == 1
    assert json.loads((repo / "runs/vqgan/tokens/manifest.json").read_text())["grid"] == [4, 4]
    toy = json.loads((repo / "runs/toy/registered.json").read_text().strip().splitlines()[-1])
    assert toy["name"] == "ganforge-toyvae" and toy["version"] == 1
    assert json.loads((repo / "runs/toy/eval/metrics.json").read_text())["fid"] > 0
    assert "loss_elbo" in (repo / "runs/toy/plots/toyvae-1.csv").read_text().splitlines()[0]
    assert "Data and pipelines are up to date" in _run(["dvc", "repro"], repo, env)
    assert "fid" in _run(["dvc", "metrics", "show"], repo, env)
    p["eval"]["num_samples"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == sorted(f"{s}@{p}" for s in ("evaluate", "register")
                                 for p in ("demo", "toy", "vqgan")), out
    assert json.loads((repo / "runs/demo/eval/metrics.json").read_text())["num_samples"] == 10


def test_dvc_repro_cyclegan_on_two_domains(tmp_path):
    """The same dvc.yaml reproduces CycleGAN when params.yaml names two domains (data.source_b): the shard stage
    writes trainA/testA/trainB/testB, and the evaluation's per-direction FIDs and cycle L1 are DVC metrics."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(source="photo:china:24", source_b="photo:flower:20", workers=1, resolution=16, val_fraction=0.25)
    p["train"].update(family="cyclegan", batch_size=4, checkpoint_kimg=1.0, log_every=2, resolution=16, workers=1)
    p["train"]["cyclegan"].update(ngf=4, ndf=4, n_blocks=1, d_layers=2, kimg=0.016)
    p["eval"].update(kid_subsets=3, workers=1)
    repo, env = _repo(tmp_path, p)
    _run(["ganforge", "-q", "dvc-stages", "--pipeline", "cg=cyclegan:runs/cg"], repo, env)
    out = _run(["dvc", "repro"], repo, env)
    for stage in ("shard", "train@cg-cyclegan-r0016", "evaluate@cg", "register@cg"):
        assert f"Running stage '{stage}'" in out, stage
    m = json.loads((repo / "data/shards/manifest.json").read_text())
    assert {k: v["count"] for k, v in m["splits"].items()} == {"trainA": 18, "testA": 6, "trainB": 15, "testB": 5}
    metrics = json.loads((repo / "runs/cg/eval/metrics.json").read_text())
    assert metrics["fid"] == pytest.approx((metrics["fid_AtoB"] + metrics["fid_BtoA"]) / 2) and 0 < metrics["cycle_l1"] < 1
    reg = json.loads((repo / "runs/cg/registered.json").read_text().strip().splitlines()[-1])
    assert reg["name"] == "ganforge-cyclegan" and reg["version"] == 1 and reg["promotion"]["promoted"]
    assert "Data and pipelines are up to date" in _run(["dvc", "repro"], repo, env)


def test_committed_stage_list_matches_params(tmp_path):
    """dvc-stages.yaml in the repository is what `ganforge dvc-stages` derives from params.yaml."""
    shutil.copy(ROOT / "dvc-stages.yaml", tmp_path / "dvc-stages.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    _run(["ganforge", "-q", "dvc-stages"], tmp_path, env)
    assert (tmp_path / "dvc-stages.yaml").read_text() == (ROOT / "dvc-stages.yaml").read_text()


def test_stale_stage_list_is_refused(tmp_path):
    shutil.copy(ROOT / "dvc-stages.yaml", tmp_path / "dvc-stages.yaml")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["train"]["resolution"] = 16  # ProGAN now ends at 16px: the list (ending at 32px) is stale
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, "-m", "ganforge.flows.cli", "-q", "train", "--set", "train.family=progan",
                        "--set", "train.out=runs/demo", "--stage", "progan-r0004", "--stages-file", "dvc-stages.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("ganforge train: error: dvc-stages.yaml is stale"), r.stderr
    assert "run `ganforge dvc-stages`" in r.stderr
