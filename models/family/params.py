"""Params sections: what a family's ``Params`` class derives from, and the shared field types."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    """A params section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError(f"both betas must be in [0, 1), got {v}")
    return v


def _check_pow2(v: int) -> int:
    if not is_pow2(v):
        raise ValueError(f"must be a power of two (4, 8, 16, 32, ...), got {v}")
    return v


Betas = Annotated[tuple[float, float], AfterValidator(_check_betas)]  # Adam's (beta1, beta2)
Pow2 = Annotated[int, AfterValidator(_check_pow2)]
