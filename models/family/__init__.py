"""The interface every family implements, in groups, and assembled here as one class, :class:`GANFamily`.

Read :mod:`.core` first: it is the whole required contract (a name, a ``Params`` section, ``stages``, ``build``,
``optimizers``, ``train_step``, ``generate``). Every other group is optional, with defaults, and says in its
docstring who needs it:

- :mod:`.sampling`: seed -> latent -> image, class labels, truncation;
- :mod:`.state`: family state outside the modules (checkpointed, restored on resume);
- :mod:`.discriminator`: what D sees (``train.augment``), ADA / Diffusion-GAN feedback, how a D step scores;
- :mod:`.products`: translators, classifiers, reconstructions; the promotion gate's metric;
- :mod:`.figures`: grids, pictures, plots, notes, extra evaluation numbers;
- :mod:`.stages`: growth between stages, ``--kimg-per-stage``, the EMA schedule;
- :mod:`.data`: the data stream a stage reads, the shards a family accepts, preparation stages;
- :mod:`.contract`: the contract test's hints (tiny params);
- :mod:`.params`: ``Section`` and the shared field types.

The Ray Train loop, checkpointing, EMA, data, logging, evaluation and the registry live in ``ganforge.tasks``
and do not know which family runs. Families register themselves (``ganforge.models.families``). This package
is the bottom of the family layer: it imports nothing from ``ganforge.tasks`` or ``ganforge.flows``.
"""

from __future__ import annotations

from ganforge.models.family.contract import ContractHints
from ganforge.models.family.core import Batch, FamilyCore, StageSpec, StepContext
from ganforge.models.family.data import DataNeeds
from ganforge.models.family.discriminator import Discriminating, score_together
from ganforge.models.family.figures import Figures
from ganforge.models.family.params import Betas, Pow2, Section, is_pow2
from ganforge.models.family.products import PRODUCTS, Products
from ganforge.models.family.sampling import Sampling
from ganforge.models.family.stages import Stages
from ganforge.models.family.state import FamilyState


class GANFamily(FamilyCore, Sampling, FamilyState, Discriminating, Products, Figures, Stages, DataNeeds,
                ContractHints):
    """One family of generative models. Subclasses set ``name`` and ``Params`` and implement the core."""


class SingleStageFamily(GANFamily):
    """A family trained as one stage at train.resolution for its section's ``kimg`` (DCGAN, SGAN, SAGAN,
    BigGAN): ``--kimg-per-stage K`` sets that ``kimg``; ``stage_info`` is what the stage carries."""

    @classmethod
    def kimg_overrides(cls, kimg: float) -> dict[str, float]:
        return {"kimg": kimg}

    def stage_info(self) -> dict:
        return {}

    def stages(self) -> list[StageSpec]:
        r = self.params.resolution
        return [StageSpec(f"{self.name}-r{r:04d}", 0, r, self.p.kimg, info=self.stage_info())]


__all__ = ["GANFamily", "SingleStageFamily", "StageSpec", "StepContext", "Batch", "Section", "Betas", "Pow2",
           "is_pow2", "PRODUCTS", "score_together"]
