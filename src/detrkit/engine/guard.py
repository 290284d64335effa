"""The non-finite guard: a step whose loss or gradients are not finite is skipped, not taken.

A NaN in one loss term (a degenerate box under mixed precision, a corrupt image) would
otherwise reach every weight through the optimiser and end the run with NaN everywhere. The
training loop asks :class:`NonFiniteGuard` about every optimiser step: a bad step is logged
with the name of the offending loss term and skipped (its gradients are dropped); after
``max_bad_steps`` bad steps in a row the guard raises :class:`TrainingDiverged`, and the
trainer saves a loadable checkpoint of the last good weights before it stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import Tensor

__all__ = ["TrainingDiverged", "NonFiniteGuard", "non_finite_terms"]


class TrainingDiverged(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or non-finite gradients."""


def non_finite_terms(total: Tensor, terms: Mapping[str, Tensor]) -> str | None:
    """``None`` when ``total`` is finite; else a description naming the non-finite terms,
    for instance ``"loss_giou=nan, loss_bbox=inf"`` (all terms when none alone is to blame)."""
    if math.isfinite(float(total.detach())):
        return None
    named = [f"{key}={float(value.detach()):.4g}" for key, value in terms.items()]
    values = [float(value.detach()) for value in terms.values()]
    bad = [item for item, value in zip(named, values, strict=True) if not math.isfinite(value)]
    return ", ".join(bad or named) or f"loss={float(total):.4g}"


class NonFiniteGuard:
    """Counts bad steps; raises :class:`TrainingDiverged` after ``max_bad_steps`` in a row.

    warn: receives one line per skipped step (``None``: silent). The count of skipped steps
    of the whole run is ``skipped``; ``streak`` is the current run of consecutive ones.
    """

    def __init__(self, max_bad_steps: int = 1, warn: Callable[[str], None] | None = None) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.warn = warn
        self.streak = 0
        self.skipped = 0

    def good(self) -> None:
        self.streak = 0

    def bad(self, epoch: int, step: int, reason: str) -> None:
        """Record a skipped step (``step``: 0-based within the epoch); raise when the streak
        reaches the limit."""
        self.streak += 1
        self.skipped += 1
        where = f"epoch {epoch}, step {step}"
        if self.streak >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{where}: {self.streak} step(s) in a row with a non-finite loss or gradients "
                f"(last: {reason}); stopping. Try a lower train.lr, a smaller "
                "train.clip_max_norm or train.amp=none, or check the data for corrupt images"
            )
        if self.warn is not None:
            self.warn(f"warning: {where} skipped: {reason} ({self.streak} in a row)")
