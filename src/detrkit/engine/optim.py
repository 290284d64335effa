"""Optimiser and learning-rate schedule of the DETR recipe.

AdamW over three parameter groups: the backbone at ``lr_backbone``, the sampling-offset and
reference-point projections of deformable attention at ``lr * linear_proj_lr_mult``
(Deformable DETR trains them 10x slower), everything else at ``lr``; one weight decay for all.
The learning rate is set before every optimiser step by :class:`LrSchedule` from the global
step alone (so a resumed run needs only the step count): ``step`` multiplies it by ``gamma``
every ``lr_drop`` epochs (the DETR recipe), ``cosine`` anneals it from the base rate to
``base * min_ratio`` over the run; both may start with a linear warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "BACKBONE_PREFIX",
    "LINEAR_PROJ_NAMES",
    "param_groups",
    "build_optimizer",
    "LrSchedule",
    "steps_per_epoch",
    "group_lrs",
    "is_backbone_param",
]

BACKBONE_PREFIX = "backbone"
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def is_backbone_param(name: str) -> bool:
    """True for parameters of the backbone: some component of the dotted name is ``backbone``."""
    return BACKBONE_PREFIX in name.split(".")


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    lr_backbone: float,
    weight_decay: float,
    linear_proj_lr_mult: float = 1.0,
    linear_proj_names: Sequence[str] = LINEAR_PROJ_NAMES,
) -> list[dict]:
    """Split the trainable parameters of ``model`` into named AdamW groups.

    A parameter belongs to the backbone when a component of its name is ``backbone``; it is a
    linear projection when its name contains one of ``linear_proj_names``. Parameters with
    ``requires_grad=False`` (frozen stages, frozen batch norm) are left out. Empty groups are
    dropped. Each group carries a ``name`` key ("main", "backbone", "linear_proj") for logging.
    """
    groups: dict[str, list[nn.Parameter]] = {"main": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_backbone_param(name):
            groups["backbone"].append(param)
        elif linear_proj_lr_mult != 1.0 and any(key in name for key in linear_proj_names):
            groups["linear_proj"].append(param)
        else:
            groups["main"].append(param)
    rates = {"main": lr, "backbone": lr_backbone, "linear_proj": lr * linear_proj_lr_mult}
    return [
        {"name": key, "params": params, "lr": rates[key], "weight_decay": weight_decay}
        for key, params in groups.items()
        if params
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    lr_backbone: float,
    weight_decay: float,
    linear_proj_lr_mult: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model``."""
    groups = param_groups(
        model,
        lr=lr,
        lr_backbone=lr_backbone,
        weight_decay=weight_decay,
        linear_proj_lr_mult=linear_proj_lr_mult,
    )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class LrSchedule:
    """The learning-rate factor of every optimiser step, applied to each group's base rate.

    steps_per_epoch: optimiser steps per epoch (batches / accumulation). total_steps: of the
    whole run (cosine ends there). warmup_steps: the first steps scale the rate linearly up to
    the schedule's (step ``i`` by ``(i + 1) / warmup_steps``). lr_drop, gamma: ``step``
    schedule, multiply by ``gamma`` after every ``lr_drop`` epochs. min_ratio: ``cosine`` ends
    at ``base * min_ratio``.
    """

    kind: Literal["step", "cosine"]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    lr_drop: int = 40
    gamma: float = 0.1
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        """The factor of the 0-based optimiser step ``step`` (the one about to be taken)."""
        if self.kind == "step":
            epoch = step // max(1, self.steps_per_epoch)  # 0-based
            value = self.gamma ** (epoch // max(1, self.lr_drop))
        else:
            progress = min(1.0, step / max(1, self.total_steps))
            value = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            value *= (step + 1) / self.warmup_steps
        return value

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's ``lr`` to its ``base_lr`` (stored on first use) times
        :meth:`factor` of ``step``."""
        value = self.factor(step)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * value


def steps_per_epoch(samples: int, batch_size: int, accumulate: int, cap: int | None) -> int:
    """Optimiser steps of an epoch over ``samples`` (one process's shard): batches (the last
    one partial) grouped by ``accumulate`` (the last group partial), at most ``cap``."""
    batches = math.ceil(samples / batch_size)
    steps = math.ceil(batches / accumulate)
    return steps if cap is None else min(steps, cap)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of each named group: ``{"lr": main, "lr_backbone": ..., ...}``."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{i}")
        out["lr" if name == "main" else f"lr_{name}"] = float(group["lr"])
    return out
