"""An exponential moving average (EMA) of a model's weights.

After every optimiser step, ``ema = d * ema + (1 - d) * weights`` for every floating-point
parameter and buffer (integer buffers are copied). The decay ramps up from 0 as
``d = decay * (1 - exp(-updates / warmup_steps))``, so the average does not stay anchored to
the random initial weights in a short run; ``warmup_steps = 0`` uses ``decay`` throughout.
The averaged model is what the trainer evaluates and checkpoints.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """The averaged copy of ``model`` (``module``: eval mode, no gradients).

    decay: in ``[0, 1)``, the weight of the old average per update. warmup_steps: the decay's
    ramp (see the module docstring). Tied parameters stay tied (the copy keeps the sharing).
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.warmup_steps = decay, warmup_steps
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (same architecture)."""
        d = self.current_decay()
        self.updates += 1
        pairs = [
            *zip(self.module.parameters(), model.parameters(), strict=True),
            *zip(self.module.buffers(), model.buffers(), strict=True),
        ]
        for average, current in pairs:
            if average.dtype.is_floating_point:
                average.lerp_(current.detach(), 1.0 - d)
            else:
                average.copy_(current)

    def state_dict(self) -> dict:
        """The EMA's own state besides its weights (they are the checkpoint's weights)."""
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
