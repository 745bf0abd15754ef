"""Family state: what a family keeps outside its modules and optimizers (StyleGAN2's path-length mean, CycleGAN's
image pools and lr schedule, a VAE's warm-up counter) and must get back on resume. Needed by a family with such
state; a family without any leaves this alone. ``train.augment``'s own state (ADA's p, Diffusion-GAN's T) is
added by :meth:`checkpoint_state` whatever the family does."""

from __future__ import annotations

from typing import Any


class FamilyState:
    def state_dict(self) -> dict[str, Any]:
        """Family state that is not in a module or optimizer; saved in every checkpoint (tensors, numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: on resume, and when a stage starts from the previous stage's
        checkpoint (override to reset what must not carry over)."""

    def rank_state_dict(self) -> dict[str, Any]:
        """State that differs per worker (CycleGAN's image pools of this rank's own fakes): every rank saves its
        own beside its RNG state, and gets it back on resume (not when a stage starts from another stage)."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`rank_state_dict` returned on this rank (empty when the checkpoint has none for it)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """:meth:`state_dict` plus the augmentation's (ADA's p, Diffusion-GAN's T): what a checkpoint stores."""
        state = dict(self.state_dict())
        aug = self.augmenter.state_dict()
        if aug:
            state["augment"] = aug
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned (resume, and a stage started from the previous one)."""
        self.load_state_dict(state)
        self.augmenter.load_state_dict(state.get("augment") or {})
