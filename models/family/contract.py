"""What the family contract test (tests/test_family_contract.py) needs to know of a family, beyond the
interface it exercises: params that make the family tiny enough to run every check in seconds, and the
parameters that legitimately get no gradient in a few steps. A family that sets neither is tested at its
default widths."""

from __future__ import annotations

from typing import Any, ClassVar


class ContractHints:
    # params for a tiny model at 8px, the contract's size: keys of this family's section ({"width": 8}), or
    # dotted keys from the top ("train.batch_size"); a subclass under another name inherits them
    contract_overrides: ClassVar[dict[str, Any]] = {}
    # named variants the contract also runs (overrides on top of contract_overrides): the textbook GANs are
    # DCGAN's losses, CGAN its conditional setting, ViT-VQGAN VQ-GAN's second tokenizer
    contract_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # non-empty: why this family's D legitimately sees which pass an image is in when train.augment is not set (the
    # reference does so); the contract then checks the batch leak only on its variants that set train.augment
    contract_batch_coupled: ClassVar[str] = ""
    # glob patterns ("D.embed.*") of trainable parameters that a few contract steps need not move: e.g.
    # embeddings of classes absent from the batches, or layers that only fade in later in a stage
    contract_untouched: ClassVar[tuple[str, ...]] = ()
