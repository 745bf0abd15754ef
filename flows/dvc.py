"""The DVC pipeline's stage list, derived from each family's own stages.

``dvc.yaml`` is generic: its ``train`` and ``prepare`` stages ``foreach`` over the entries that
``ganforge dvc-stages`` writes into ``dvc-stages.yaml`` (loaded as DVC vars), one entry per stage of each
pipeline (a family and its run folder). Changing ``train.resolution`` or a family's stage count is then
``ganforge dvc-stages`` (``make repro`` runs it), not an edit of dvc.yaml. Each entry records a hash of the
stages it was made from, and ``ganforge train --stages-file`` refuses a stale list with one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ganforge.models.families import get_family
from ganforge.tasks.io import sha256_json
from ganforge.tasks.params import Params

STAGES_FILE = "dvc-stages.yaml"
KEY = "ganforge"  # the vars' top-level key (must not clash with params.yaml's sections, which DVC also loads)
HEADER = ("# Written by `ganforge dvc-stages` from params.yaml and each family's stage list; dvc.yaml iterates it.\n"
          "# Do not edit: change params.yaml (or the --pipeline list) and run `ganforge dvc-stages` again.\n")


def pipeline_params(params: Params, family: str, out: str) -> Params:
    d = params.model_dump(mode="json")
    d["train"].update(family=family, out=out)
    return Params.model_validate(d)


def stages_hash(params: Params) -> str:
    """What a pipeline's stage list depends on: the family's stages (names, kinds, resolutions, lengths)."""
    return sha256_json([[s.name, s.kind, s.resolution, s.kimg] for s in get_family(params.train).stages()])


def build(params: Params, pipelines: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``pipelines``: name -> (family, run folder). Returns the vars document."""
    from ganforge.tasks.train import prepared_dir  # brings Ray Train: only when a stage list is written
    shards = params.data.shards
    doc: dict[str, Any] = {"pipelines": {}, "train": {}, "prepare": {}}
    for name, (family, out) in pipelines.items():
        p = pipeline_params(params, family, out)
        fam = get_family(p.train)
        run = f"--set train.family={family} --set train.out={out}"
        init = None  # the checkpoint the next stage starts from
        data = shards
        for st in fam.stages():
            key = f"{name}-{st.name}"
            entry = {"run": run, "stage": st.name, "init": f"--init {init}" if init else "",
                     "after": init or STAGES_FILE, "pipeline": name}
            if st.kind == "prepare":  # e.g. VQ-GAN's tokens
                prepared = str(prepared_dir(Path(out), st))
                doc["prepare"][key] = {**entry, "data": data, "out": prepared}
                data = prepared  # later stages read the prepared shards; init stays the stage before
                continue
            stage_dir = f"{out}/stages/{st.name}"
            doc["train"][key] = {**entry, "data": data, "out": stage_dir, "plot": f"{out}/plots/{st.name}.csv",
                                 "y": fam.plot_key(st)}
            init = stage_dir
        doc["pipelines"][name] = {"family": family, "out": out, "run": run, "final": init,
                                  "stages_sha256": stages_hash(p)}
    return {KEY: doc}


def write_stages(params: Params, pipelines: dict[str, tuple[str, str]] | None = None,
                 path: str | Path = STAGES_FILE) -> dict[str, Any]:
    """Write ``path``; ``pipelines`` defaults to the ones already in it, else params' family and train.out."""
    path = Path(path)
    if pipelines is None:
        pipelines = existing_pipelines(path) or {"demo": (params.train.family, params.train.out)}
    doc = build(params, pipelines)
    text = HEADER + yaml.safe_dump(doc, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return doc[KEY]


def existing_pipelines(path: str | Path = STAGES_FILE) -> dict[str, tuple[str, str]]:
    path = Path(path)
    if not path.exists():
        return {}
    doc = (yaml.safe_load(path.read_text()) or {}).get(KEY, {})
    return {k: (v["family"], v["out"]) for k, v in (doc.get("pipelines") or {}).items()}


def check_fresh(params: Params, stage: str, path: str | Path = STAGES_FILE) -> None:
    """Refuse to run ``stage`` from a stage list that no longer matches params (one clear line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `ganforge dvc-stages` first")
    doc = (yaml.safe_load(path.read_text()) or {}).get(KEY, {})
    mine = [n for n, v in (doc.get("pipelines") or {}).items()
            if v["family"] == params.train.family and v["out"] == params.train.out]
    if not mine:
        raise ValueError(f"{path} has no pipeline for family {params.train.family} in {params.train.out}: "
                         f"run `ganforge dvc-stages`")
    if doc["pipelines"][mine[0]]["stages_sha256"] != stages_hash(params):
        names = ", ".join(s.name for s in get_family(params.train).stages())
        raise ValueError(f"{path} is stale: params now give the stages {names}; run `ganforge dvc-stages`, "
                         f"then `dvc repro`")
