"""Checkpoints: a folder with ``state.pt`` (weights, optimizer states, counters, family state, resolved params;
loaded with ``weights_only=True``: data, never code), ``meta.json`` and ``grid.png``, on local disk or in Ray
Train storage (``s3://``).

A checkpoint is complete only when its write finished: ``meta.json`` is written last and records the size and
sha256 of ``state.pt``. Every reader validates before it loads (:func:`checkpoint_problem`); resume falls back
to the newest valid checkpoint and says which it skipped and why."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganforge.models.family import GANFamily, StageSpec
from ganforge.models.families import get_family
from ganforge.tasks.errors import CheckpointError
from ganforge.tasks.io import sha256_file
from ganforge.tasks.params import TrainParams
from ganforge.tasks.storage import arrow_fs, is_remote

log = logging.getLogger("ganforge.checkpoint")

STATE = "state.pt"
META = "meta.json"
GRID = "grid.png"


@contextlib.contextmanager
def checkpoint_dir(ckpt: Any):
    """A local directory for a checkpoint given as a path, a URL or a ray.train.Checkpoint."""
    if ckpt is None:
        yield None
    elif isinstance(ckpt, (str, Path)) and "://" not in str(ckpt):
        yield Path(ckpt)
    else:
        if isinstance(ckpt, (str, Path)):
            import ray.train

            fs, path = arrow_fs(str(ckpt))
            ckpt = ray.train.Checkpoint(path, filesystem=fs)
        with ckpt.as_directory() as d:
            yield Path(d)


# ----------------------------------------------------------------------------- writing


def rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(st["numpy"]), dtype=np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(json.loads(st["python"])), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def restore_rng(ckpt_dir: str | Path, rank: int) -> dict:
    """Continue this rank's global RNG streams where the checkpoint left them (when it has them); returns this
    rank's family state (:meth:`GANFamily.rank_state_dict`; empty when the checkpoint has none for this rank)."""
    path = Path(ckpt_dir) / f"rng-{rank}.pt"
    if not path.exists():
        return {}
    st = torch.load(path, weights_only=True)
    set_rng_state(st)
    return st.get("family") or {}


def write_checkpoint(folder: str | Path, rank: int, state: dict | None, metrics: dict,
                     rank_state: dict | None = None) -> None:
    """Write one rank's part of a checkpoint into ``folder``: its RNG state and its own family state
    (``rank_state``), and on rank 0 (``state`` given) the complete state (weights, EMA, optimizers, counters,
    family state, resolved params) and ``meta.json``, the human-readable summary, written last."""
    folder = Path(folder)
    torch.save({**rng_state(), **({"family": rank_state} if rank_state else {})}, folder / f"rng-{rank}.pt")
    if state is None:
        return
    torch.save(state, folder / STATE)
    meta = {k: v for k, v in state.items() if k not in ("modules", "ema", "optimizers", "params", "family_state")}
    meta["files"] = {STATE: {"size": (folder / STATE).stat().st_size, "sha256": sha256_file(folder / STATE)}}
    (folder / META).write_text(json.dumps({**meta, "metrics": metrics}, indent=2))  # last: marks it complete


# ----------------------------------------------------------------------------- reading


def checkpoint_problem(ckpt: str | Path, *, full: bool = False) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None when it is. Cheap by default (meta.json present and
    whole, state.pt of the recorded size); ``full`` also compares state.pt's sha256."""
    import pyarrow.fs as pafs

    fs, path = arrow_fs(str(ckpt))
    meta_info, state_info = fs.get_file_info([f"{path}/{META}", f"{path}/{STATE}"])
    if meta_info.type != pafs.FileType.File:
        return f"no {META} (its write did not finish)"
    try:
        with fs.open_input_stream(meta_info.path) as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({type(e).__name__})"
    if state_info.type != pafs.FileType.File:
        return f"no {STATE}"
    rec = (meta.get("files") or {}).get(STATE) if isinstance(meta, dict) else None
    if rec:
        if state_info.size != rec["size"]:
            return f"{STATE} has {state_info.size} bytes, {META} records {rec['size']} (a torn write)"
        if full:
            import hashlib

            h = hashlib.sha256()
            with fs.open_input_stream(state_info.path) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != rec["sha256"]:
                return f"{STATE} does not match the sha256 in {META} (damaged)"
    elif not is_remote(ckpt) and not zipfile.is_zipfile(state_info.path):
        return f"{STATE} is not a complete archive (a torn write)"  # written before sizes were recorded
    return None


def require_complete(ckpt: str | Path) -> None:
    """Raise CheckpointError naming ``ckpt`` and what is wrong when it is not a complete checkpoint."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}; use an earlier checkpoint")


def load_state(ckpt_dir: str | Path, *, validated: bool = False) -> dict:
    """The state of a checkpoint folder, validated first (unless the caller just did): a damaged one raises
    CheckpointError naming it."""
    path = Path(ckpt_dir) / STATE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no {STATE}")
    if not validated:
        require_complete(ckpt_dir)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
        # not torch's own text: it suggests weights_only=False, i.e. running whatever code the damaged file holds
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {STATE} is not a readable checkpoint "
                              f"({type(e).__name__}); use an earlier checkpoint") from None


def latest_checkpoint(storage: str, stage: StageSpec, ranks: int | None = None) -> str | None:
    """The newest complete checkpoint of ``stage`` over all its attempts in ``storage``; newer damaged ones
    (a crash during a write) are skipped with a warning that names them and why. With ``ranks``, a checkpoint
    also needs the part of every rank (``rng-<rank>.pt``)."""
    import pyarrow.fs as pafs

    fs, root = arrow_fs(storage)
    try:
        attempts = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return None
    found = []
    for a in attempts:
        if a.type != pafs.FileType.Directory or not a.base_name.startswith(stage.name + "-"):
            continue
        for c in fs.get_file_info(pafs.FileSelector(a.path)):
            if c.type == pafs.FileType.Directory and c.base_name.startswith("ckpt-"):
                found.append((c.base_name, c.path))
    scheme = f"{storage.split('://')[0]}://" if "://" in storage else ""
    for _, path in sorted(found, reverse=True):
        uri = f"{scheme}{path}" if scheme else path
        problem = checkpoint_problem(uri)
        if problem is None and ranks:
            missing = [r for r in range(ranks) if fs.get_file_info(f"{path}/rng-{r}.pt").type != pafs.FileType.File]
            problem = f"no part of rank(s) {missing}" if missing else None
        if problem is None:
            return uri
        log.warning("stage %s: skipping checkpoint %s: %s", stage.name, uri, problem)
    return None


def load_generator(checkpoint: str | Path, device: str = "cpu") -> tuple[GANFamily, StageSpec, dict, dict]:
    """(family, stage, EMA modules, state) of a checkpoint: the checkpoint, not the caller's params, says
    which family and stage it is."""
    if not is_remote(checkpoint) and not Path(checkpoint, STATE).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found (no {STATE})")
    require_complete(checkpoint)  # before a remote one is downloaded
    with checkpoint_dir(str(checkpoint)) as d:
        state = load_state(d, validated=True)
    family, stage, ema = build_generator(state["params"], state["stage"], state["ema"], state.get("family_state"),
                                         device)
    return family, stage, ema, state


def build_generator(train_params: dict, stage_name: str, ema_state: dict, family_state: dict | None,
                    device: str = "cpu") -> tuple[GANFamily, StageSpec, dict]:
    """(family, stage, EMA modules in eval mode) rebuilt from the training params and the EMA state dicts (a
    checkpoint's, or an exported model's)."""
    tp = TrainParams.model_validate(train_params)
    family = get_family(tp)
    stage = next((s for s in family.stages() if s.name == stage_name), None)
    if stage is None:
        raise ValueError(f"checkpoint stage {stage_name} is not a stage of its own params")
    modules = family.build(stage)
    ema = {k: modules[k] for k in family.ema_names(stage)}
    for k, m in ema.items():
        m.load_state_dict(ema_state[k])
        m.to(device).eval().requires_grad_(False)
    if family_state:
        family.restore_state(family_state)
    return family, stage, ema
