"""Reading checkpoints: a checkpoint is a folder with ``state.pt`` (weights, optimizer states, counters,
family state, resolved params; loaded with ``weights_only=True``: data, never code), ``meta.json`` and
``grid.png``, on local disk or in Ray Train storage (``s3://``)."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganforge.models.family import GANFamily, StageSpec
from ganforge.models.families import get_family
from ganforge.tasks.params import TrainParams
from ganforge.tasks.storage import arrow_fs

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


def restore_rng(ckpt_dir: str | Path, rank: int) -> None:
    """Continue this rank's global RNG streams where the checkpoint left them (when it has them)."""
    path = Path(ckpt_dir) / f"rng-{rank}.pt"
    if path.exists():
        set_rng_state(torch.load(path, weights_only=True))


def write_checkpoint(folder: str | Path, rank: int, state: dict | None, metrics: dict) -> None:
    """Write one rank's part of a checkpoint into ``folder``: its RNG state, and on rank 0 (``state`` given) the
    complete state (weights, EMA, optimizers, counters, family state, resolved params) and ``meta.json``, the
    human-readable summary, written last."""
    folder = Path(folder)
    torch.save(rng_state(), folder / f"rng-{rank}.pt")
    if state is None:
        return
    torch.save(state, folder / STATE)
    meta = {k: v for k, v in state.items() if k not in ("modules", "ema", "optimizers", "params", "family_state")}
    (folder / META).write_text(json.dumps({**meta, "metrics": metrics}, indent=2))


# ----------------------------------------------------------------------------- reading


def load_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / STATE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no {STATE}")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(storage: str, stage: StageSpec) -> str | None:
    """The newest complete checkpoint of ``stage`` over all its attempts in ``storage``."""
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
                if fs.get_file_info(f"{c.path}/{STATE}").type == pafs.FileType.File:
                    found.append((c.base_name, c.path))
    if not found:
        return None
    best = max(found)[1]
    return best if "://" not in storage else f"{storage.split('://')[0]}://{best}"


def load_generator(checkpoint: str | Path, device: str = "cpu") -> tuple[GANFamily, StageSpec, dict, dict]:
    """(family, stage, EMA modules, state) of a checkpoint: the checkpoint, not the caller's params, says
    which family and stage it is."""
    with checkpoint_dir(str(checkpoint)) as d:
        state = load_state(d)
    tp = TrainParams.model_validate(state["params"])
    family = get_family(tp)
    stage = next((s for s in family.stages() if s.name == state["stage"]), None)
    if stage is None:
        raise ValueError(f"checkpoint stage {state['stage']} is not a stage of its own params")
    modules = family.build(stage)
    ema = {k: modules[k] for k in family.ema_names(stage)}
    for k, m in ema.items():
        m.load_state_dict(state["ema"][k])
        m.to(device).eval().requires_grad_(False)
    if state.get("family_state"):
        family.load_state_dict(state["family_state"])
    return family, stage, ema, state
