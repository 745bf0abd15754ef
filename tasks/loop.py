"""The shared training loop: one stage of any GAN family, on any number of workers.

It knows nothing family-specific. It builds the stage's modules, starts them
from the previous stage (grow) or from this stage's latest checkpoint (resume),
streams the shards for its rank, runs the family's step, keeps the EMA copies,
reports metrics and writes complete checkpoints with a sample grid.

``run_stage`` runs under a :class:`Session`: :class:`RaySession` inside a Ray
Train worker, :class:`LocalSession` in-process (tests, benchmarks baseline).

Every random draw of a step comes from a generator seeded by (seed, stage, rank,
step), and the data stream skips the batches already consumed, so a resumed
stage continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ganforge.models.family import GANFamily, StageSpec, StepContext
from ganforge.models.families import get_family
from ganforge.tasks.checkpoint import GRID, checkpoint_dir, load_state, restore_rng, write_checkpoint
from ganforge.tasks.data import iter_split, make_stream, to_model_input, train_loader
from ganforge.tasks.history import record_report
from ganforge.tasks.images import save_grid
from ganforge.tasks.params import TrainParams

log = logging.getLogger("ganforge.train")


# ----------------------------------------------------------------------------- sessions


class LocalSession:
    """Single-process session: checkpoints go to ``ckpt_root/<dir_name>``; reports are recorded in the run
    folder here (under Ray, the driver records them from a Ray Train callback)."""

    rank, world_size = 0, 1

    def __init__(self, ckpt_root: str | Path, resume_from: str | None = None, device: str | None = None):
        self.ckpt_root = Path(ckpt_root)
        self.resume_from = resume_from
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict] = []
        self.checkpoints: list[str] = []
        self.run_dir: Path | None = None
        self.stage = ""

    def attach(self, run_dir: Path | None, stage: str) -> None:
        self.run_dir, self.stage = run_dir, stage

    def get_checkpoint(self) -> str | None:
        return self.resume_from

    def newest_checkpoint(self, storage: str, stage) -> str | None:
        return None

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict, ckpt_dir: str | None = None, name: str | None = None) -> None:
        """Record ``metrics``; with ``ckpt_dir`` (a folder the session now owns), keep it as checkpoint ``name``."""
        self.reports.append(dict(metrics))
        if self.run_dir is not None:
            grid = Path(ckpt_dir, GRID) if ckpt_dir is not None else None
            record_report(self.run_dir, self.stage, metrics, grid.read_bytes() if grid and grid.exists() else None)
        if ckpt_dir is not None:
            dst = self.ckpt_root / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(ckpt_dir, dst)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            self.checkpoints.append(str(dst))


ROWS = "rows"  # a Ray Train report's metric rows since the previous report (the report's own metrics are the last)


class RaySession:
    """Inside a Ray Train worker (Train V2 API).

    Ray Train's controller takes one report per worker at each of its polls (every 2 s), and a worker whose
    previous report is still queued waits for that poll. Reporting every ``log_every`` steps therefore made
    every worker wait up to 2 s per report: at 8px that halved throughput. So the rows of every
    ``log_every`` step are kept here and sent together, at most every ``interval`` seconds (rank 0's clock
    decides for every rank: each rank must report the same number of times), and always with a checkpoint.
    A checkpoint's upload runs in Ray's background thread (``CheckpointUploadMode.ASYNC``) while training
    goes on."""

    def __init__(self, interval: float = 0.0):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.interval = interval
        self.rows: list[dict] = []
        self.sent_at = time.monotonic()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def attach(self, run_dir: Path | None, stage: str) -> None:
        """Nothing: the driver records the reports (tasks/train.py's ReportForwarder)."""

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def newest_checkpoint(self, storage: str, stage) -> str | None:
        """The newest checkpoint of ``stage`` on storage with every rank's part, as rank 0 finds it. Ray registers
        a checkpoint when its controller next polls (up to 2 s after the report): a worker that dies sooner would
        otherwise send its group back to an older one."""
        from ganforge.tasks.checkpoint import latest_checkpoint

        found = [latest_checkpoint(storage, stage, ranks=self.world_size) if self.rank == 0 else None]
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(found, 0)
        return found[0]

    def _due(self) -> bool:
        """Whether ``interval`` has passed since the last report, by rank 0's clock, on every rank."""
        due = time.monotonic() - self.sent_at >= self.interval
        if self.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(flag, 0)
            due = bool(flag.item())
        return due

    def report(self, metrics: dict, ckpt_dir: str | None = None, name: str | None = None) -> None:
        """Keep ``metrics`` as a row; send the rows when due or with ``ckpt_dir`` (a folder the session now
        owns: Ray deletes it after the upload)."""
        import ray.train

        self.rows.append(dict(metrics))
        if ckpt_dir is None and not self._due():
            return
        payload, self.rows = {**metrics, ROWS: self.rows}, []
        self.sent_at = time.monotonic()
        if ckpt_dir is None:
            ray.train.report(payload)
            return
        ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir), checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


# ----------------------------------------------------------------------------- state


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def _ckpt_images(ckpt) -> int:
    """The images a checkpoint folder (named ckpt-<images>) holds; -1 for another name."""
    name = str(getattr(ckpt, "path", ckpt)).rstrip("/").rsplit("/", 1)[-1]
    return int(name[5:]) if name.startswith("ckpt-") and name[5:].isdigit() else -1


def step_seed(seed: int, stage: int, rank: int, step: int) -> int:
    return (((seed * 1_000_003 + stage) * 1_009 + rank) * 1_000_000_007 + step) % (2**63 - 1)


# ----------------------------------------------------------------------------- the loop


def run_stage(config: dict, session=None) -> dict:
    """Train one stage. ``config``: params (TrainParams dump), stage (index), shards, run_dir,
    init (checkpoint path of the previous stage, or None), optional max_steps."""
    session = session or RaySession()
    params = TrainParams.model_validate(config["params"])
    family: GANFamily = get_family(params)
    stage: StageSpec = family.stages()[config["stage"]]
    if stage.kind != "train":
        raise ValueError(f"stage {stage.name} is a {stage.kind} stage, not a training stage")
    ema_names = family.ema_names(stage)
    rank, world, dev = session.rank, session.world_size, session.device
    if params.batch_size % world:
        raise ValueError(f"train.batch_size ({params.batch_size}) must be divisible by the {world} workers")
    per_rank = params.batch_size // world
    use_cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = use_cuda
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(params.seed * 1009 + stage.index)  # identical init on every rank
    modules = family.build(stage)
    opts_state = None
    step = images = drawn = 0  # drawn: batches taken from the stream (> step when a step draws extra ones)
    resume = session.get_checkpoint()
    source = "resume"
    if resume is None and config.get("resume"):
        resume = config["resume"]
    if config.get("storage"):  # a restarted worker group: a checkpoint persisted after Ray's newest registered one
        newer = session.newest_checkpoint(config["storage"], stage)
        if newer is not None and (resume is None or _ckpt_images(newer) > _ckpt_images(resume)):
            resume = newer
    if resume is None:
        source = "grow" if config.get("init") else "scratch"
    ema: dict[str, nn.Module]
    with checkpoint_dir(resume if resume is not None else config.get("init")) as d:
        state = load_state(d) if d is not None else None
        if source == "resume":
            if state["stage"] != stage.name:
                raise ValueError(f"checkpoint {resume} is of stage {state['stage']}, not {stage.name}")
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            ema = {k: copy.deepcopy(modules[k]) for k in ema_names}
            for k, m in ema.items():
                m.load_state_dict(state["ema"][k])
            opts_state = state["optimizers"]
            step, images = state["step"], state["images_in_stage"]
            drawn = int(state.get("batches_drawn", step))
            family.restore_state(state.get("family_state") or {})
            family.load_rank_state_dict(restore_rng(d, rank))
        else:
            if state is not None:
                family.grow(modules, state["modules"])
                family.restore_state(state.get("family_state") or {})  # e.g. ADA's p continues into the stage
            ema = {k: copy.deepcopy(modules[k]) for k in ema_names}
            if state is not None:
                family.grow(ema, state["ema"])
    attempt_start = images
    if rank == 0:
        log.info("stage %s (%dpx, %.1f kimg): %s at %.2f kimg on %d worker(s), %s", stage.name, stage.resolution,
                 stage.kimg, source, images / 1000, world, dev)
        for k, v in family.notes(stage).items():
            log.warning("stage %s: %s %s", stage.name, k, v)

    mem = torch.channels_last if use_cuda else torch.contiguous_format
    for k in list(modules):
        modules[k] = modules[k].to(dev, memory_format=mem)
        if any(p.requires_grad for p in modules[k].parameters()):  # frozen modules are not wrapped in DDP
            modules[k] = session.prepare(modules[k])
    frozen = {k for k, m in modules.items() if not any(p.requires_grad for p in m.parameters())}
    for m in ema.values():
        m.to(dev).eval().requires_grad_(False)
    opts = family.optimizers({k: _unwrap(m) for k, m in modules.items()})
    if opts_state is not None:
        for k, o in opts.items():
            o.load_state_dict(opts_state[k])

    amp_dtype = torch.bfloat16 if (use_cuda and torch.cuda.is_bf16_supported()) else torch.float16
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if (use_cuda and params.amp) else contextlib.nullcontext
    no_sync = lambda m: m.no_sync() if hasattr(m, "no_sync") else contextlib.nullcontext()  # noqa: E731

    stream = make_stream(family.data_stream(stage), config["shards"], stage, per_rank, rank=rank, world_size=world,
                         seed=params.seed * 1009 + stage.index, xflip=params.xflip, start_batch=drawn)
    batches = train_loader(stream, params.loader_workers)

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal drawn
        drawn += 1
        return {k: v.to(dev, non_blocking=True, memory_format=mem) if v.ndim == 4 else v.to(dev)
                for k, v in zip(stream.fields, next(batches))}

    total = int(round(stage.kimg * 1000))
    every = max(1, int(round(params.checkpoint_kimg * 1000)))
    use_ema = family.use_ema(stage)
    ema_start = family.ema_start(stage)
    grid_seeds = [params.seed * 1_000_003 + i for i in range(params.grid_size**2)]
    session.attach(Path(config["run_dir"]) if config.get("run_dir") else None, stage.name)

    def grid_real(split: str = "train") -> torch.Tensor:
        """The first grid_size^2 images of a split (fixed across checkpoints and resumes), at this stage's size."""
        imgs, _ = next(iter_split(config["shards"], split, params.grid_size**2))
        return to_model_input(imgs, stage.resolution).to(dev)
    max_steps = config.get("max_steps")

    window_t, window_imgs = time.perf_counter(), 0
    last: dict[str, float] = {}
    ckpt_path = None
    while images < total and (max_steps is None or step < max_steps):
        drawn_before = drawn
        batch = next_batch()
        ctx = StepContext(step, images, torch.Generator().manual_seed(step_seed(params.seed, stage.index, rank, step)),
                          dev, autocast, no_sync, next_batch)
        last = {**family.train_step(modules, opts, batch, stage, ctx), **family.augmenter.metrics()}  # ADA's p, T
        with torch.no_grad():
            b = 0.0  # before the EMA start (or without EMA) the copies follow the weights
            if use_ema and images >= ema_start:
                b = 0.5 ** (params.batch_size / family.ema_half_life(stage, images, params.ema_half_life_kimg * 1000))
            for k, e in ema.items():
                if k in frozen:  # e.g. the prior stage's autoencoder: nothing changes
                    continue
                src = _unwrap(modules[k])
                for pe, p in zip(e.parameters(), src.parameters()):
                    pe.lerp_(p.detach(), 1.0 - b)
                for be, bs in zip(e.buffers(), src.buffers()):
                    be.copy_(bs)
        prev_images = images
        step += 1
        shown = params.batch_size * (drawn - drawn_before)  # every real batch the step drew (n_critic > 1: several)
        images += shown
        window_imgs += shown
        done = images >= total or (max_steps is not None and step >= max_steps)
        at_ckpt = done or images // every > prev_images // every
        if at_ckpt or step % params.log_every == 0:
            if use_cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            metrics = {**last, "stage": stage.name, "step": step, "kimg": images / 1000,
                       "images_per_s": window_imgs / max(now - window_t, 1e-9)}
            window_t, window_imgs = now, 0
            if rank == 0:
                losses = " ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("loss") or k == "alpha")
                log.info("%s step %d kimg %.2f/%.1f %s %.0f img/s", stage.name, step, images / 1000, total / 1000,
                         losses, metrics["images_per_s"])
            if at_ckpt:
                name = f"ckpt-{images:010d}"
                tmp = tempfile.mkdtemp(prefix="ganforge-ckpt-")  # the session owns it from its report on
                try:
                    state = None
                    if rank == 0:
                        state = {
                            "family": family.name, "stage": stage.name, "stage_index": stage.index,
                            "resolution": stage.resolution, "step": step, "images_in_stage": images,
                            "batches_drawn": drawn, "family_state": family.checkpoint_state(),
                            "alpha": float(last.get("alpha", 1.0)), "attempt_start_images": attempt_start,
                            "modules": {k: _unwrap(m).state_dict() for k, m in modules.items()},
                            "ema": {k: m.state_dict() for k, m in ema.items()},
                            "optimizers": {k: o.state_dict() for k, o in opts.items()},
                            "params": params.model_dump(mode="json"),
                        }
                        imgs = family.grid(ema, stage, grid_seeds, grid_real, images_in_stage=images).cpu()
                        save_grid(imgs, Path(tmp) / GRID, family.grid_columns(stage))
                    write_checkpoint(tmp, rank, state, metrics, family.rank_state_dict())
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                session.report(metrics, tmp, name)
                ckpt_path = name
            else:
                session.report(metrics)
    return {"step": step, "images_in_stage": images, "checkpoint": ckpt_path, "metrics": last}


def ray_train_loop(config: dict) -> None:
    """Entry point of every Ray Train worker: its log goes to ``<run_dir>/logs/<stage>.rank<r>.log``."""
    import ray.train

    from ganforge.tasks.console import FORMAT, worker_logging

    logging.basicConfig(level=logging.INFO, format=FORMAT)
    tp = config["params"]
    stage = config.get("stage_name") or f"stage{config['stage']}"
    worker_logging(config.get("run_dir"), stage, ray.train.get_context().get_world_rank(),
                   bool(config.get("verbose")))
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    try:
        run_stage(config, RaySession(float(config.get("report_interval_s", 0.0))))
    except BaseException:
        log.exception("stage %s failed on this worker (family %s)", stage, tp.get("family"))
        raise
