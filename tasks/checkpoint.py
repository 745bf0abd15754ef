"""Reading checkpoints: a checkpoint is a folder with ``state.pt`` (weights, optimizer states, counters,
family state, resolved params; loaded with ``weights_only=True``: data, never code), ``meta.json`` and
``grid.png``, on local disk or in Ray Train storage (``s3://``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

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
