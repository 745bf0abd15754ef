"""The family contract: every registered family (built-in or entry-point plugin) proves the same things, in one
process, without Ray, at 8px with the tiny widths the family declares (``contract_overrides``). A family that
registers is tested here; nothing else needs editing.

Per family, over each of its stages in order (a preparation stage runs as the pipeline runs it):
- build and a few steps on a real shard stream (digits at 8px with a labelled split; two photo domains for an
  unpaired translator);
- exact resume: N steps, stop, resume M more == N+M steps, tensor for tensor (modules, EMA copies, optimizer
  states, family state, counters);
- every trainable parameter moves (receives a gradient) within those steps, and a frozen one does not;
- ``state_dict`` round-trips: modules and family state loaded into fresh objects give the same state;
- the product's contract: per-seed sampling is deterministic and does not depend on the batch a seed sits in;
  a translator maps images to images; a classifier gives class probabilities; an autoencoder reconstructs;
- D cannot tell real from fake by which pass an image was in (the batch-statistics leak of the fidelity
  review): trained to separate two batches whose other halves differ, it must not separate their halves that
  come from one distribution;
- bad params are refused in one line naming the key.

``test_the_contract_catches_a_family_that_breaks_resume`` shows that the exact-resume check fails on a family
that forgets part of its state (``brokenresume`` in tests/plugins).
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import pytest
import torch

from ganforge.models.families import family_classes, get_family
from ganforge.models.family import PRODUCTS
from ganforge.tasks.checkpoint import load_generator, load_state
from ganforge.tasks.loop import LocalSession, run_stage
from ganforge.tasks.params import DataParams, ParamsError, load_params
from ganforge.tasks.shard import shard

RES = 8
BATCH = 4
LEAK_RES = 16  # the batch-leak check builds D at this size (no data needed)
STOP, TOTAL = 2, 4  # exact resume: TOTAL steps == STOP steps, then resumed to TOTAL
BROKEN = {"brokenresume"}  # a test-only family that must fail the resume check (see the last test)
FAMILIES = sorted(set(family_classes()) - BROKEN)
# every family at its contract size, and each of its named variants (DCGAN's losses, CGAN, ViT-VQGAN, ...)
# (a subclass under another name, such as the tests' fault-injecting wrappers, runs its parent's variants only if it
# declares them itself)
CASES = [(n, None) for n in FAMILIES] + [(n, v) for n in FAMILIES
                                          for v in vars(family_classes()[n]).get("contract_variants", {})]


@pytest.fixture(scope="module")
def shards8(tmp_path_factory) -> Path:
    """Real digits at 8x8 (their native size) with a labelled split of 2 images per class."""
    out = tmp_path_factory.mktemp("contract-digits") / "shards"
    shard("digits", out, DataParams(resolution=RES, shard_size=600, workers=1, labelled_per_class=2), progress=False)
    return out


@pytest.fixture(scope="module")
def photos8(tmp_path_factory) -> Path:
    """Two unpaired photo domains at 8x8 (crops of scikit-learn's two photographs)."""
    out = tmp_path_factory.mktemp("contract-photos") / "shards"
    shard("photo:china:24", out, DataParams(source_b="photo:flower:24", resolution=RES, shard_size=12, workers=1,
                                            val_fraction=0.25), progress=False)
    return out


def tiny_params(name: str, variant: str | None = None, **extra):
    cls = family_classes()[name]
    section = {**cls.contract_overrides, **(cls.contract_variants[variant] if variant else {})}
    over = {"train.family": name, "train.resolution": RES, "train.batch_size": BATCH, "train.grid_size": 2,
            "train.checkpoint_kimg": 1000.0, "train.log_every": 1000, "train.ema_half_life_kimg": 0.01,
            "train.seed": 7, **extra}
    for k, v in section.items():
        over[k if k.startswith("train.") else f"train.{name}.{k}"] = v
    return load_params(None, over)


def _equal(a, b, where: str) -> None:
    """Tensor-for-tensor equality of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def resume_problems(full: dict, resumed: dict) -> list[str]:
    """What differs between an uninterrupted and a stopped-and-resumed checkpoint state."""
    bad = []
    for key in ("modules", "ema", "optimizers", "family_state", "step", "images_in_stage", "batches_drawn"):
        try:
            _equal(full[key], resumed[key], key)
        except AssertionError as e:
            bad.append(str(e).splitlines()[0] or key)
    return bad


def run_contract_stages(name: str, shards: Path, tmp: Path, variant: str | None = None):
    """Every stage of the family in order; per training stage: full, stopped and resumed runs. Yields
    (stage, params, config, full checkpoint, stopped checkpoint, resumed checkpoint)."""
    from ganforge.tasks.prepare import prepare

    torch.set_num_threads(1)
    params = tiny_params(name, variant)
    family = get_family(params.train)
    init, data = None, shards
    for st in family.stages():
        d = tmp / st.name
        if st.kind == "prepare":
            prepare(init, st.index, shards, d / "out", workers=1, progress=False)
            data = d / "out"
            continue
        cfg = {"params": params.train.model_dump(mode="json"), "stage": st.index, "shards": str(data),
               "run_dir": None, "init": init}
        full, part = LocalSession(d / "full", device="cpu"), LocalSession(d / "part", device="cpu")
        run_stage({**cfg, "max_steps": TOTAL}, full)
        run_stage({**cfg, "max_steps": STOP}, part)
        resumed = LocalSession(d / "resumed", resume_from=part.checkpoints[-1], device="cpu")
        run_stage({**cfg, "max_steps": TOTAL}, resumed)
        yield st, params, cfg, full.checkpoints[-1], part.checkpoints[-1], resumed.checkpoints[-1]
        init = full.checkpoints[-1]


def data_for(name: str, shards8: Path, photos8: Path) -> Path:
    return photos8 if family_classes()[name].domains else shards8


@pytest.mark.parametrize("name,variant", CASES, ids=[n if v is None else f"{n}-{v}" for n, v in CASES])
def test_family_contract(name, variant, shards8, photos8, tmp_path):
    cls = family_classes()[name]
    assert cls.product in PRODUCTS, f"{name}: product {cls.product!r} is not one of {PRODUCTS}"
    ran = 0
    for st, params, cfg, full_ckpt, part_ckpt, resumed_ckpt in run_contract_stages(
            name, data_for(name, shards8, photos8), tmp_path, variant):
        ran += 1
        full, part, resumed = load_state(full_ckpt), load_state(part_ckpt), load_state(resumed_ckpt)
        assert full["step"] == TOTAL and part["step"] == STOP, f"{st.name}: steps {part['step']} / {full['step']}"

        # exact resume
        bad = resume_problems(full, resumed)
        assert not bad, f"{st.name}: resumed run differs from the uninterrupted one: {bad[:5]}"

        # every trainable parameter moves between step STOP and TOTAL; a frozen one never does
        family = get_family(params.train)
        modules = family.build(st)
        still = []
        for mname, m in modules.items():
            for pname, prm in m.named_parameters():
                key = f"{mname}.{pname}"
                moved = not torch.equal(full["modules"][mname][pname], part["modules"][mname][pname])
                if prm.requires_grad and not moved and not any(fnmatch.fnmatch(key, g) for g in cls.contract_untouched):
                    still.append(key)
                if not prm.requires_grad:
                    assert not moved, f"{st.name}: frozen parameter {key} changed"
        assert not still, f"{st.name}: trainable parameters without a gradient in {TOTAL - STOP} steps: {still[:8]}"

        # state_dict round trip: modules strictly, family state through a fresh instance
        for mname, m in modules.items():
            m.load_state_dict(full["modules"][mname], strict=True)
            _equal(dict(m.state_dict()), dict(full["modules"][mname]), f"{st.name}: {mname}")
        fresh = get_family(params.train)
        fresh.restore_state(full["family_state"] or {})
        _equal(fresh.checkpoint_state(), full["family_state"] or {}, f"{st.name}: family state")

        # the product
        fam, stage, ema, _ = load_generator(full_ckpt)
        check_product(fam, stage, ema, shards8 if not cls.domains else photos8)

    assert ran, f"{name} has no training stage"
    # the discriminator scores each image on its own merits, not by its pass: at 16px, where every D has the
    # layers its normalization sits in (at 8px DCGAN's D has no BatchNorm layer at all)
    if cls.contract_batch_coupled and "train.augment" not in (cls.contract_variants.get(variant) or {}):
        return  # the family says why its D sees batch statistics without augmentation (DCGAN's reference)
    leak = get_family(tiny_params(name, variant, **{"train.resolution": LEAK_RES}).train)
    for st in leak.stages():
        if st.kind == "train":
            check_no_batch_leak(leak, st)


def _real_images(shards: Path, n: int, split: str = "train") -> torch.Tensor:
    from ganforge.tasks.data import iter_split, to_model_input

    imgs, _ = next(iter_split(shards, split, n))
    return to_model_input(imgs, RES)


def check_product(fam, stage, ema, shards: Path) -> None:
    where = f"{fam.name}/{stage.name}"
    if fam.product == "generator" and fam.can_sample(stage):
        seeds = [11, 12, 13]
        a = fam.sample(ema, stage, seeds)
        assert a.shape == (3, 3, stage.resolution, stage.resolution), f"{where}: sample shape {tuple(a.shape)}"
        assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1, f"{where}: samples outside [-1, 1]"
        assert torch.equal(a, fam.sample(ema, stage, seeds)), f"{where}: sampling is not deterministic per seed"
        b = fam.sample(ema, stage, [12])
        assert torch.allclose(a[1:2], b, atol=1e-5), f"{where}: a seed's sample depends on the batch it sits in"
        assert not torch.allclose(a[0], a[1]), f"{where}: two seeds gave the same image"
    elif fam.product == "translator":
        split = f"test{fam.directions[next(iter(fam.directions))][0]}" if fam.directions else "train"
        x = _real_images(shards, 3, split if fam.directions else "train")
        y = fam.translate_images(ema, stage, x)
        assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1, f"{where}: translation"
        assert torch.allclose(fam.translate_images(ema, stage, x[1:2]), y[1:2], atol=1e-5), \
            f"{where}: an image's translation depends on its batch"
    elif fam.product == "classifier":
        x = _real_images(shards, 5)
        p = fam.classify(ema, stage, x)
        assert p.shape[0] == 5 and p.shape[1] >= 2, f"{where}: class probabilities of shape {tuple(p.shape)}"
        assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(5), atol=1e-5), f"{where}: not probabilities"
        assert torch.allclose(fam.classify(ema, stage, x[2:3]), p[2:3], atol=1e-5), f"{where}: batch-dependent"
    if fam.can_reconstruct(stage):
        x = _real_images(shards, 3)
        r = fam.reconstruct(ema, x)
        assert r.shape == x.shape and r.abs().max() <= 1, f"{where}: reconstruction"


def check_no_batch_leak(family, stage, steps: int = 60) -> None:
    """Train D, through the family's own scoring, to tell a real batch from a fake one. Half of each batch is
    the same kind of noise in both (no per-image difference); the other half differs (digit-like blobs vs dimmed
    ones). A D that scores each image on its own cannot separate the noise halves; one that sees a batch's
    statistics can (the fidelity review measured 100 % with BatchNorm and separate passes)."""
    torch.manual_seed(0)
    modules = family.build(stage)
    g = torch.Generator().manual_seed(1)
    n, res = 8, stage.resolution

    def batches():
        noise = torch.randn(2, n // 2, 3, res, res, generator=g).clamp(-1, 1)
        blobs = (torch.rand(n // 2, 1, res, res, generator=g) > 0.6).float().expand(-1, 3, -1, -1) * 2 - 1
        real = torch.cat([noise[0], blobs])
        fake = torch.cat([noise[1], blobs * 0.3 - 0.5])
        labels = torch.randint(0, max(family.num_classes, 1), (n,), generator=g) if family.num_classes else None
        return real, fake, labels

    if family.discriminate(modules, stage, *batches()) is None:
        return  # no discriminator that scores images
    for m in modules.values():
        m.train()
    opt = torch.optim.Adam([p for m in modules.values() for p in m.parameters() if p.requires_grad], lr=2e-3)

    def logits():
        r, f = family.discriminate(modules, stage, *batches())
        return r.float().reshape(n, -1).mean(1), f.float().reshape(n, -1).mean(1)

    for _ in range(steps):
        r, f = logits()
        loss = torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hits = total = 0
    gap = 0.0
    for _ in range(8):
        with torch.no_grad():
            r, f = logits()
        rn, fn = r[: n // 2], f[: n // 2]  # the noise halves
        t = torch.cat([rn, fn]).median()
        hits += int((rn > t).sum() + (fn <= t).sum())
        total += n
        gap += float(rn.mean() - fn.mean()) / 8
    learned = float((r[n // 2:].mean() - f[n // 2:].mean()))
    acc = hits / total
    assert acc < 0.8, (f"{family.name}/{stage.name}: D told same-distribution noise apart by its batch ({acc:.0%} "
                       f"correct, mean logit gap {gap:+.2f}; on the differing halves {learned:+.2f})")


def _one_problem(err: Exception, key: str) -> bool:
    """The refusal names ``key`` on its one problem line (under the 'invalid parameters in ...' header)."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    assert len(lines) <= 2 and key in lines[-1], lines
    return True


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_params_are_refused_in_one_line(name):
    with pytest.raises(ParamsError) as e:
        load_params(None, {"train.family": name, f"train.{name}.no_such_key": 1})
    assert _one_problem(e.value, f"train.{name}.no_such_key")
    fields = family_classes()[name].Params.model_fields
    numeric = next((k for k, f in fields.items() if f.annotation in (int, float)), None)
    if numeric is not None:
        with pytest.raises(ParamsError) as e:
            load_params(None, {"train.family": name, f"train.{name}.{numeric}": "not-a-number"})
        assert _one_problem(e.value, f"train.{name}.{numeric}")


def test_the_contract_catches_a_family_that_breaks_resume(shards8, photos8, tmp_path):
    """``brokenresume`` (tests/plugins) is the toy VAE with a step counter it does not checkpoint: the resumed
    run's KL warm-up restarts, so its weights drift from the uninterrupted run's. The contract must say so."""
    assert "brokenresume" in family_classes()
    problems = []
    for st, _, _, full_ckpt, _, resumed_ckpt in run_contract_stages("brokenresume", shards8, tmp_path):
        problems += resume_problems(load_state(full_ckpt), load_state(resumed_ckpt))
        break
    assert problems and any(p.startswith("modules") for p in problems), problems
