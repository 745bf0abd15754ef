"""ProGAN stages as real Ray Train jobs (local Ray, CPU workers, gloo DDP)."""

import json
from pathlib import Path

import pytest
import torch

from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.params import Params, ParamsError
from ganforge.tasks.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def ray_params(tmp_path, **train) -> Params:
    t = dict(out=str(tmp_path / "run"), resolution=8, workers=2, batch_size=16, checkpoint_kimg=0.08, log_every=5,
             ema_half_life_kimg=0.1, max_failures=1, grid_size=4,
             progan=dict(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.08, stabilize_kimg=0.08))
    t.update(train)
    return Params.model_validate({"train": t})


def _meta(ckpt: str) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def test_two_workers_two_stages_then_rerun_skips(digits_shards, tmp_path):
    # a row every step, but one Ray Train report per minute at most: the rows travel with the checkpoint reports
    p = ray_params(tmp_path, log_every=1, report_interval_s=60)
    s = train(digits_shards, p.train.out, p)
    run = Path(p.train.out)
    from ganforge.tasks.history import read_history

    rows = read_history(run, "progan-r0008")
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[-1]["kimg"] == 0.16
    assert all(r["images_per_s"] > 0 and "loss_d" in r for r in rows)
    assert list(s["stages"]) == ["progan-r0004", "progan-r0008"]
    final = s["final_checkpoint"]
    assert final == s["stages"]["progan-r0008"]["checkpoint"] and Path(final, "state.pt").exists()
    st = load_state(final)
    assert st["resolution"] == 8 and st["images_in_stage"] == 160
    # one grid per checkpoint: stage 4 has 80 images (every 80) -> 1; stage 8 has 160 -> 2
    grids = sorted(x.name for x in (run / "samples").iterdir())
    assert grids == ["progan-r0004-0000.080kimg.png", "progan-r0008-0000.080kimg.png", "progan-r0008-0000.160kimg.png"]
    for rec in s["stages"].values():
        assert rec["images_per_s"] > 0 and rec["wall_time_s"] > 0
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["final_checkpoint"] == final
    # rerun: nothing retrained
    s2 = train(digits_shards, p.train.out, p)
    assert s2["stages"] == s["stages"]
    # different model params cannot silently resume this run
    with pytest.raises(ParamsError, match=r"other training parameters \(train.batch_size: 16 in the run, 8 now\); "
                                           r"use a new --out") as e:
        train(digits_shards, p.train.out, ray_params(tmp_path, batch_size=8))
    assert e.value.exit_code == 2


def faulty(p: Params, **fault) -> Params:
    """The same run with the test-only family `progan_faulty` (tests/plugins), which kills one worker once."""
    d = p.model_dump(mode="json")
    d["train"].update(family="progan_faulty", progan_faulty={**d["train"]["progan"], **fault})
    return Params.model_validate(d)


def test_worker_death_mid_stage_is_recovered(digits_shards, tmp_path):
    marker = tmp_path / "killed"
    p = faulty(ray_params(tmp_path, checkpoint_kimg=0.032), fail_stage="progan-r0008", fail_step=6, fail_rank=1,
               fail_marker=str(marker))
    s = train(digits_shards, p.train.out, p)
    assert marker.exists(), "the failure was injected"
    final = s["final_checkpoint"]
    meta = _meta(final)
    assert meta["images_in_stage"] == 160
    # restarted from the latest checkpoint, not from scratch: the one before step 6 (images 64), or step 6's own
    # (96) when its background upload finished before the worker died (a busy machine's timing)
    assert meta["attempt_start_images"] in (64, 96)


def test_stylegan2_worker_death_mid_stage_is_recovered(digits_shards, tmp_path):
    """StyleGAN2 (lazy R1 and path-length steps, its running mean in the family state) loses a worker mid-stage:
    Ray Train restarts the group from the latest checkpoint, not from scratch."""
    marker = tmp_path / "killed"
    d = ray_params(tmp_path, checkpoint_kimg=0.032).model_dump(mode="json")
    d["train"].update(family="stylegan2_faulty", stylegan2_faulty=dict(
        channel_base=64, channel_max=8, latent_dim=8, w_dim=8, mapping_layers=2, kimg=0.16, r1_interval=2,
        pl_interval=2, fail_stage="stylegan2_faulty-r0008", fail_step=6, fail_rank=1, fail_marker=str(marker)))
    p = Params.model_validate(d)
    s = train(digits_shards, p.train.out, p)
    assert marker.exists(), "the failure was injected"
    meta = _meta(s["final_checkpoint"])
    assert meta["images_in_stage"] == 160 and 0 < meta["attempt_start_images"] <= 6 * 16
    assert load_state(s["final_checkpoint"])["family_state"]["pl_mean"] > 0


def test_cyclegan_worker_death_mid_stage_is_recovered(photo_shards, tmp_path):
    """CycleGAN on two workers loses one mid-stage, mid-decay: Ray Train restarts the group from the latest
    checkpoint, each rank getting its own history pools back (a pool larger than the run holds every fake its
    rank made: 24, not the 16 made after the restart), and the stage ends at lr 0."""
    marker = tmp_path / "killed"
    d = ray_params(tmp_path, resolution=16, batch_size=4, checkpoint_kimg=0.016).model_dump(mode="json")
    d["train"].update(family="cyclegan_faulty", cyclegan_faulty=dict(
        ngf=4, ndf=4, n_blocks=1, d_layers=2, kimg=0.048, pool_size=64, fail_stage="cyclegan_faulty-r0016",
        fail_step=7, fail_rank=1, fail_marker=str(marker)))
    p = Params.model_validate(d)
    s = train(photo_shards, p.train.out, p)
    assert marker.exists(), "the failure was injected"
    meta = _meta(s["final_checkpoint"])
    assert meta["images_in_stage"] == 48 and meta["attempt_start_images"] == 16
    st = load_state(s["final_checkpoint"])
    assert st["family_state"]["lr_schedule"]["factor"] == 0.0
    pools = [torch.load(Path(s["final_checkpoint"], f"rng-{r}.pt"), weights_only=True)["family"] for r in (0, 1)]
    assert all(pl[f"pool_{d}"].shape == (24, 3, 16, 16) for pl in pools for d in "AB")
    assert not torch.equal(pools[0]["pool_A"], pools[1]["pool_A"])  # each rank's own fakes


def test_interrupted_run_resumes_on_rerun(digits_shards, tmp_path):
    p = faulty(ray_params(tmp_path, max_failures=0, checkpoint_kimg=0.032), fail_stage="progan-r0008",
               fail_step=5, fail_rank=0, fail_marker=str(tmp_path / "killed"))
    with pytest.raises(RuntimeError, match="progan-r0008"):
        train(digits_shards, p.train.out, p)
    summary = json.loads((Path(p.train.out) / "summary.json").read_text())
    assert summary["stages"]["progan-r0004"]["done"] and "progan-r0008" not in summary["stages"]
    s = train(digits_shards, p.train.out, p)
    rec = s["stages"]["progan-r0008"]
    assert rec["resumed_from"] and rec["resumed_from"].endswith("ckpt-0000000064")
    assert _meta(s["final_checkpoint"])["attempt_start_images"] == 64


def test_fid_curve_beside_training_spans_the_stages(digits_shards, tmp_path):
    """eval.every_kimg: checkpoints on the interval (and each stage's last) are scored by their own Ray tasks
    while training goes on; the curve spans both stages on a cumulative kimg axis, becomes a DVC plot, a PNG
    and an MLflow metric history keyed by images; the best checkpoint by FID is kept in RUN_DIR/best, which
    registry.checkpoint: best picks."""
    import mlflow

    from ganforge.tasks.checkpoint import load_generator
    from ganforge.tasks.curve import Curve, chosen_checkpoint, read_curve
    from ganforge.tasks.registry import log_training, start_pipeline_run

    d = ray_params(tmp_path).model_dump(mode="json")
    d["eval"].update(every_kimg=0.08, every_num_samples=8, cache_dir=str(tmp_path / "cache"))
    d["runtime"].update(mlflow_tracking_uri=f"sqlite:///{tmp_path}/m.db", mlflow_artifact_root=str(tmp_path / "a"))
    d["data"]["shards"] = str(digits_shards)
    p = Params.model_validate(d)
    s = train(digits_shards, p.train.out, p, curve=Curve(p, p.train.out))
    run = Path(p.train.out)
    rows = read_curve(run)
    assert [(r["stage"], r["kimg"]) for r in rows] == [("progan-r0004", 0.08), ("progan-r0008", 0.16),
                                                       ("progan-r0008", 0.24)]
    assert all(r["fid"] > 0 for r in rows) and [r["step"] for r in rows] == [80, 160, 240]
    assert (run / "plots" / "curve.csv").read_text().splitlines()[0] == "kimg,stage,fid"
    assert (run / "curve.png").stat().st_size > 0
    best = json.loads((run / "best.json").read_text())
    assert best["value"] == min(r["fid"] for r in rows) and best["metric"] == "fid"
    fam, stage, _, _ = load_generator(run / "best")
    assert stage.name == best["stage"]
    last = s["final_checkpoint"]
    assert chosen_checkpoint(p, last) == last
    picked = Params.model_validate({**d, "registry": {"checkpoint": "best"}})
    assert chosen_checkpoint(picked, last) == str((run / "best").resolve())
    run_id = start_pipeline_run(p, digits_shards, "curve")
    log_training(s, run, p, run_id)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "curve_fid")] == [80, 160, 240]
    child = client.search_runs([client.get_run(run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{run_id}' and tags.stage = 'progan-r0008'")[0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [160, 240]
    assert "plots/curve.png" in [a.path for a in client.list_artifacts(run_id, "plots")]
