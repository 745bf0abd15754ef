"""The Prefect flow on the Prefect test harness with real Ray (CPU), real MLflow (sqlite) and tiny data:
a full run, a second run that hits the caches, and a run interrupted inside a stage (a worker killed,
no Ray-level restarts) that the stage task's retry resumes from the latest checkpoint.

One flow per KIND of family, not per family (every family's in-process contract is
tests/test_family_contract.py): progressive (ProGAN), single-stage GAN (StyleGAN2), multi-stage with a prepare
stage (VQ-GAN), classifier product (SGAN), two-domain translator (CycleGAN), and a family from outside ganforge
(toyvae)."""

import json
from pathlib import Path

import pytest

from ganforge.tasks.params import Params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny(tmp_path: Path, name: str, **train) -> Params:
    t = dict(out=str(tmp_path / name), resolution=8, workers=2, batch_size=16, checkpoint_kimg=0.032, log_every=2,
             max_failures=0, progan=dict(fmap_max=16, fmap_base=64, latent_dim=16, transition_kimg=0.064,
                                         stabilize_kimg=0.032))
    t.update(train)
    return Params.model_validate({
        "data": dict(source="synthetic:shapes:48", shards=str(tmp_path / "shards"), resolution=8, workers=1),
        "train": t,
        "eval": dict(num_samples=8, kid_subsets=3, workers=1, cache_dir=str(tmp_path / "cache")),
        "runtime": dict(mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", mlflow_artifact_root=str(tmp_path / "art")),
    })


def _task_states(flow_run_id):
    from prefect import get_client
    import anyio

    async def go():
        async with get_client() as c:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name: r.state.name for r in runs}

    return anyio.run(go)


def test_flow_full_run_then_cached_rerun(harness, tmp_path):
    from ganforge.flows.pipeline import train_pipeline

    p = tiny(tmp_path, "run")
    state = train_pipeline(params=p, return_state=True)
    r = state.result()
    assert r["fid"] > 0 and r["version"] == 1 and r["promoted"] and Path(r["grid"]).exists()
    first = _task_states(state.state_details.flow_run_id)
    assert all(v == "Completed" for v in first.values()), first
    state2 = train_pipeline(params=p, return_state=True)
    second = _task_states(state2.state_details.flow_run_id)
    cached = {k for k, v in second.items() if v == "Cached"}
    expected = {k for k in second if k.startswith(("shard", "train-stage"))}
    assert cached == expected and len(expected) == 3, second
    r2 = state2.result()
    assert r2["version"] == 1, "the same checkpoint with the same metrics is not registered twice"


def test_flow_interrupted_stage_resumes(harness, tmp_path):
    from ganforge.flows.pipeline import train_pipeline

    marker = tmp_path / "killed"
    base = tiny(tmp_path, "crash").train.progan.model_dump()
    # the test-only family progan_faulty (tests/plugins) kills a worker once, from outside ganforge
    p = tiny(tmp_path, "crash", family="progan_faulty", progan_faulty={
        **base, "fail_stage": "progan-r0008", "fail_step": 5, "fail_rank": 0, "fail_marker": str(marker)})
    state = train_pipeline(params=p, return_state=True)
    # the stage task's retry (with back-off) resumes the interrupted stage from its latest checkpoint
    assert state.is_completed() and marker.exists()
    r = state.result()
    summary = json.loads((Path(p.train.out) / "summary.json").read_text())
    rec = summary["stages"]["progan-r0008"]
    assert rec["resumed_from"] and rec["resumed_from"].endswith("ckpt-0000000064")
    assert r["final_checkpoint"] == rec["checkpoint"] and rec["images_seen"] == 96


def test_flow_runs_the_vqgan_family(harness, tmp_path):
    """The same flow trains VQ-GAN's heterogeneous stages (autoencoder -> tokens -> prior), evaluates samples
    and reconstructions, and registers a generator that samples through prior + decoder."""
    from ganforge.flows.pipeline import train_pipeline
    from ganforge.tasks.registry import sample_registered, setup_mlflow

    p = tiny(tmp_path, "vq", family="vqgan", batch_size=8, vqgan=dict(
        ch=8, ch_mult=[1, 2], z_channels=8, embed_dim=8, n_embed=16, disc_start=2, disc_ch=8, disc_layers=1, n_layer=1, n_head=2,
        n_embd=16, autoencoder_kimg=0.032, prior_kimg=0.032, token_workers=1))
    state = train_pipeline(params=p, return_state=True)
    r = state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert sorted(k for k in states if k.startswith("train-stage")) == [f"train-stage-{i}" for i in range(3)]
    assert all(v == "Completed" for v in states.values()), states
    assert r["fid"] > 0 and r["rfid"] > 0 and 0 < r["codebook_usage"] <= 1
    assert r["model"] == "ganforge-vqgan" and r["version"] == 1
    setup_mlflow(p.runtime)
    imgs = sample_registered(f"models:/{r['model']}/{r['version']}", [0, 1, 2])
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == "uint8"
    assert (Path(p.train.out) / "tokens" / "manifest.json").exists()


def test_flow_runs_a_family_from_outside_ganforge(harness, tmp_path):
    """toyvae is defined in tests/plugins and found through its entry point: the same flow trains its two
    chained stages on Ray, evaluates, registers and samples it, with no edit to ganforge. Each step draws one
    extra batch (ctx.next_batch, as WGAN's n_critic or BigGAN's D steps) on each of the two workers: every batch
    drawn counts as images shown."""
    from ganforge.flows.pipeline import train_pipeline
    from ganforge.tasks.registry import sample_registered, setup_mlflow

    p = tiny(tmp_path, "toy", family="toyvae", toyvae=dict(width=8, stage_kimg=0.064, extra_batches=1))
    state = train_pipeline(params=p, return_state=True)
    r = state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert sorted(k for k in states if k.startswith("train-stage")) == ["train-stage-0", "train-stage-1"]
    assert r["model"] == "ganforge-toyvae" and r["version"] == 1 and r["fid"] > 0
    summary = json.loads((Path(p.train.out) / "summary.json").read_text())
    assert [rec["images_seen"] for rec in summary["stages"].values()] == [64, 64]  # 2 steps x 2 batches of 16 each
    assert summary["stages"]["toyvae-2"]["last_metrics"]["steps_seen"] == 4  # family state carried across stages
    setup_mlflow(p.runtime)
    imgs = sample_registered(f"models:/{r['model']}/{r['version']}", [0, 1, 2])
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == "uint8"


def test_flow_runs_the_classifier_family(harness, tmp_path):
    """The semi-supervised GAN, whose product is a classifier: the same flow trains it on a labelled subset,
    evaluation reports its accuracy next to the supervised-only baseline's and the generator's FID; the registry
    holds a model that takes images, and the gate compares accuracy, higher being better, by the family's
    default."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow import MlflowClient

    from ganforge.flows.pipeline import train_pipeline
    from ganforge.tasks.data import iter_split
    from ganforge.tasks.registry import setup_mlflow

    section = dict(width=8, latent_dim=8, kimg=0.096, num_classes=3)  # synthetic shapes: 3 classes
    base = tiny(tmp_path, "sgan", family="sgan", sgan=section).model_dump(mode="json")
    base["data"]["labelled_per_class"] = 4
    base["eval"].update(num_samples=12, class_min_images=2)
    p = Params.model_validate(base)
    r = train_pipeline(params=p, return_state=True).result()
    assert r["fid"] > 0 and r["model"] == "ganforge-sgan" and r["version"] == 1 and r["promoted"]
    summary = json.loads((Path(p.train.out) / "summary.json").read_text())
    assert summary["stages"]["sgan-r0008"]["images_seen"] == section["kimg"] * 1000
    assert 0 <= r["scores"]["accuracy"] <= 1 and 0 <= r["scores"]["baseline_accuracy"] <= 1
    setup_mlflow(p.runtime)
    model = mlflow.pyfunc.load_model(f"models:/{r['model']}@champion")
    assert model.metadata.get_model_info().flavors  # a pyfunc from uint8 images, with a signature
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    imgs, _ = next(iter_split(p.data.shards, "val", 4))
    probs = np.asarray(model.predict(imgs))
    assert probs.shape == (len(imgs), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    tags = MlflowClient().get_model_version(r["model"], r["version"]).tags
    assert tags["promotion.metric"] == "accuracy (higher is better)"


def test_flow_runs_a_single_stage_gan(harness, tmp_path):
    """One single-stage GAN stands for them all (DCGAN, SAGAN, BigGAN share its plumbing; their own behaviour is
    tested in-process): StyleGAN2 trains class-conditionally on digits (the label embedded into the mapping network)
    with its lazy regularizers and Diffusion-GAN's T adapted from both workers' D(real). It is evaluated (FID and
    intra-class FID) and registered; the registered model takes labels (refusing one out of range) and truncation
    psi as a lerp toward w_avg (psi = 0: one image for every seed), refuses a psi outside [0, 1], and
    `ganforge stylemix` draws from it; the style-mixing, truncation and interpolation figures are logged to the
    pipeline's MLflow run."""
    import mlflow
    import numpy as np
    from PIL import Image

    from ganforge.flows.cli import main
    from ganforge.flows.pipeline import train_pipeline
    from ganforge.models.families import get_family
    from ganforge.tasks.checkpoint import load_state
    from ganforge.tasks.registry import sample_registered, setup_mlflow

    section = dict(latent_dim=8, w_dim=8, mapping_layers=2, channel_base=64, channel_max=8, kimg=0.064,
                   conditional=True, r1_interval=2, pl_interval=2)
    base = tiny(tmp_path, "stylegan2", family="stylegan2", augment="diffusion",
                diffusion=dict(t_init=50, kimg=1.0, interval=1), stylegan2=section).model_dump(mode="json")
    base["data"].update(source="digits", shards=str(tmp_path / "digits8"))
    base["eval"].update(num_samples=30, class_min_images=2)
    p = Params.model_validate(base)
    r = train_pipeline(params=p, return_state=True).result()
    assert r["fid"] > 0 and r["model"] == "ganforge-stylegan2" and r["version"] == 1 and r["promoted"]
    summary = json.loads((Path(p.train.out) / "summary.json").read_text())
    assert list(summary["stages"]) == ["stylegan2-r0008"]
    rec = summary["stages"]["stylegan2-r0008"]
    assert rec["images_seen"] == section["kimg"] * 1000
    m = rec["last_metrics"]  # T was adjusted from the workers' r_d at every D step, logged, and checkpointed
    assert 5 <= m["diffusion_T"] <= 1000 and -1 <= m["diffusion_rd"] <= 1  # within [t_min, t_max]
    fam = get_family(p.train)
    fam.restore_state(load_state(rec["checkpoint"])["family_state"])
    assert fam.augmenter.metrics()["diffusion_T"] == m["diffusion_T"]
    # intra-class FID over the classes with enough val images; the others are named, not averaged in
    ev = json.loads((Path(p.train.out) / "eval" / "evaluation.json").read_text())
    assert r["scores"]["intra_fid"] > 0
    assert set(ev["intra_fid_classes"]) | set(ev["intra_fid_too_few"]) == {str(c) for c in range(10)}
    setup_mlflow(p.runtime)
    uri = f"models:/{r['model']}@champion"
    labels = [3, 3]
    same = sample_registered(uri, [0, 1], truncation=0.0, labels=labels)
    assert same.shape == (2, 8, 8, 3) and np.array_equal(same[0], same[1])  # the w_avg image
    free = sample_registered(uri, [0, 1], labels=labels)
    assert not np.array_equal(free[0], free[1])
    with pytest.raises(Exception, match=r"truncation psi must be in \[0, 1\]"):
        sample_registered(uri, [0], truncation=1.5, labels=labels[:1])
    assert not np.array_equal(*sample_registered(uri, [0, 0], labels=[0, 1]))  # one seed, two classes
    with pytest.raises(Exception, match=r"labels must be in \[0, "):
        sample_registered(uri, [0], labels=[10])
    figures = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(run_id=r["mlflow_run_id"],
                                                                           artifact_path="figures")}
    assert {"stylegan2-r0008-stylemix-coarse.png", "stylegan2-r0008-truncation.png",
            "stylegan2-r0008-interpolation.png"} <= figures
    out = tmp_path / "mix.png"
    assert main(["-q", "stylemix", "--set", f"runtime.mlflow_tracking_uri={p.runtime.mlflow_tracking_uri}",
                 "--model", uri, "--rows", "0,1", "--cols", "2-4", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 33 + 1, 3 * 33 + 1)


def test_flow_runs_cyclegan_and_its_model_translates(harness, tmp_path, capsys):
    """CycleGAN on the offline photo pair (temple crops -> flower crops): the same flow shards two domains,
    trains on two workers, scores each direction against the other domain's real test images (the mean FID is
    what the gate compares) with the cycle-reconstruction L1, and registers a model that takes uint8 images and
    a direction. `ganforge translate` writes what the registered model returns for the same input, resizing
    other sizes; bad input is one clear line and a non-zero exit."""
    import mlflow
    import numpy as np
    from PIL import Image

    from ganforge.flows.cli import main
    from ganforge.flows.pipeline import train_pipeline
    from ganforge.tasks.data import iter_split
    from ganforge.tasks.registry import setup_mlflow
    from ganforge.tasks.sources import prepare

    base = tiny(tmp_path, "cyclegan", family="cyclegan", resolution=16, batch_size=4,
                cyclegan=dict(ngf=4, ndf=4, n_blocks=1, d_layers=2, kimg=0.032)).model_dump(mode="json")
    base["data"].update(source="photo:china:40", source_b="photo:flower:32", resolution=16,
                        shards=str(tmp_path / "photos"), val_fraction=0.2)
    p = Params.model_validate(base)
    r = train_pipeline(params=p, return_state=True).result()
    s = r["scores"]
    assert r["model"] == "ganforge-cyclegan" and r["version"] == 1 and r["promoted"]
    assert s["fid"] == pytest.approx((s["fid_AtoB"] + s["fid_BtoA"]) / 2) and s["fid_AtoB"] > 0
    assert 0 < s["cycle_l1"] < 1 and s["cycle_l1"] == pytest.approx((s["cycle_l1_A"] + s["cycle_l1_B"]) / 2)
    ev = json.loads((Path(p.train.out) / "eval" / "evaluation.json").read_text())
    assert ev["translations"]["AtoB"] == {"translated": "testA", "count": 8, "reference_split": "testB",
                                          "reference_count": 7, "cache": "miss"}
    assert ev["directions"]["fid_BtoA"] == "lower" and ev["directions"]["cycle_l1"] == "lower"

    setup_mlflow(p.runtime)
    uri = f"models:/{r['model']}@champion"
    model = mlflow.pyfunc.load_model(uri)
    sig = model.metadata.signature
    assert sig.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    assert sig.params.to_dict() == [{"name": "direction", "type": "string", "default": "AtoB", "shape": None}]
    a, _ = next(iter_split(p.data.shards, "testA", 3))
    ab = model.predict(a)
    assert ab.shape == (3, 16, 16, 3) and ab.dtype == np.uint8
    assert np.array_equal(model.predict(a, params={"direction": "AtoB"}), ab)
    assert not np.array_equal(model.predict(a, params={"direction": "BtoA"}), ab)
    with pytest.raises(Exception, match="direction must be one of AtoB, BtoA; got 'sideways'"):
        model.predict(a, params={"direction": "sideways"})
    with pytest.raises(Exception, match="does not match expected dtype uint8"):
        model.predict(a.astype(np.float32))

    # translate: the user's files, one at the model's size and one larger (resized, and the log says so)
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.fromarray(a[0]).save(mine / "small.png")
    big = np.asarray(Image.fromarray(a[1]).resize((40, 40), Image.Resampling.NEAREST))
    Image.fromarray(big).save(mine / "big.png")
    tracking = f"runtime.mlflow_tracking_uri={p.runtime.mlflow_tracking_uri}"
    capsys.readouterr()
    assert main(["-q", "translate", "--set", tracking, "--model", uri, "--input", str(mine),
                 "--direction", "BtoA", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "big.png is 40x40: centre-cropped and resized to this 16px model's 16x16" in captured.err
    out_small = np.asarray(Image.open(tmp_path / "out" / "small.png"))
    assert np.array_equal(out_small, model.predict(a[:1], params={"direction": "BtoA"})[0])
    big_in = prepare(Image.open(mine / "big.png"), 16)[None]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "big.png")),
                          model.predict(big_in, params={"direction": "BtoA"})[0])
    # a damaged file among good ones: the good ones are written, the run fails naming the bad one
    (mine / "torn.png").write_bytes((mine / "small.png").read_bytes()[:60])
    assert main(["-q", "translate", "--set", tracking, "--model", uri, "--input", str(mine),
                 "--out", str(tmp_path / "out2")]) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 3 input file(s) could not be read" in err and "torn.png: truncated image file" in err
    assert (tmp_path / "out2" / "small.png").exists() and (tmp_path / "out2" / "big.png").exists()
    assert main(["-q", "translate", "--set", tracking, "--model", uri, "--input", str(mine),
                 "--direction", "AtoC"]) == 4
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--direction must be one of AtoB, BtoA, "
                                                                      "got 'AtoC'")
