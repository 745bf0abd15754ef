"""What a family reads: the data stream of each training stage, the shards it accepts, and preparation stages.

- :meth:`data_stream` names the stream a stage reads, from tasks/data.py's registry: ``images`` (the default),
  ``labelled`` (a mix with the labelled split in every batch: SGAN), ``two-domain`` ((A, B) batches: CycleGAN),
  ``tokens`` (a prepared stage's code grids: VQ-GAN's prior). A new kind of data is a new stream registered
  there (``register_stream``), and a family that names it.
- A stage of ``kind="prepare"`` turns every shard into new shards with the previous stage's EMA modules (VQ-GAN's
  tokens; later IC-GAN's features and neighbours): the shared code (tasks/prepare.py) reads, batches, runs
  shards in parallel, writes and caches; the family says what one batch becomes (:meth:`prepare_encode`) and
  what the output manifest records (:meth:`prepare_manifest`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ganforge.models.family.core import StageSpec


class DataNeeds:
    def data_stream(self, stage: StageSpec) -> str:
        """The name of the stream a training stage reads (see the module docstring)."""
        return stage.info.get("data", "images")

    def check_data(self, manifest: dict, shards: Any) -> None:
        """Refuse shards this family cannot train on (ValueError, one line), before any worker starts. By default:
        a class-conditional family needs shards with exactly its number of classes; two-domain shards are for a
        family with ``domains``, and it needs them."""
        two = manifest.get("kind") == "two-domain"
        if two and not self.domains:
            raise ValueError(f"the shards in {shards} hold two unpaired domains (trainA/trainB): family {self.name} "
                             f"trains on one; shard a single source for it, or train an unpaired translator "
                             f"(train.family: cyclegan)")
        if self.domains and not two:
            raise ValueError(f"family {self.name} translates between two unpaired domains but the shards in {shards} "
                             f"hold one: shard with `ganforge shard --source A --source-b B`, or a folder with "
                             f"trainA/ trainB/ testA/ testB/")
        if not self.num_classes:
            return
        classes = manifest.get("classes") or []
        if not classes:
            raise ValueError(f"family {self.name} is class-conditional ({self.num_classes} classes) but the shards in "
                             f"{shards} have no labels: shard a labelled source (class subfolders, digits) or train "
                             f"it unconditionally")
        if len(classes) != self.num_classes:
            raise ValueError(f"family {self.name} is set for {self.num_classes} classes but the shards in {shards} "
                             f"have {len(classes)} ({', '.join(map(str, classes[:5]))}, ...): set "
                             f"the train.{self.name} section's class count to {len(classes)}")

    # --- preparation stages (kind="prepare")
    def prepare_encode(self, ema: dict[str, nn.Module], stage: StageSpec,
                       images: torch.Tensor) -> tuple[list[dict[str, bytes]], dict[str, np.ndarray]]:
        """One batch of a shard (model inputs in [-1, 1], NCHW at the checkpoint's resolution, on the CPU) ->
        (per image, the fields of its output sample, e.g. {"npy": ...}; counts to sum over each split, e.g. a
        code histogram). The image's key and label are written by the caller. Must be deterministic."""
        raise NotImplementedError(f"family {self.name} declares no preparation stage")

    def prepare_manifest(self, stage: StageSpec, ema: dict[str, nn.Module],
                         counts: dict[str, dict[str, np.ndarray]]) -> tuple[dict, dict[str, dict]]:
        """(fields of the output manifest, with its ``kind``, which the reading stream checks; per split, numbers
        for its manifest entry and the stage's metrics) from each split's summed counts."""
        raise NotImplementedError(f"family {self.name} declares no preparation stage")
