"""Optimiser and learning-rate schedule of the DETR recipe.

AdamW over three parameter groups: the backbone at ``lr_backbone``, the sampling-offset and
reference-point projections of deformable attention at ``lr * linear_proj_lr_mult``
(Deformable DETR trains them 10x slower), everything else at ``lr``; one weight decay for all.
The schedule is a single step: ``lr *= gamma`` after ``lr_drop`` epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BACKBONE_PREFIX",
    "LINEAR_PROJ_NAMES",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, lr_drop: int, gamma: float
) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every group's learning rate by ``gamma`` every ``lr_drop`` epochs (stepped once
    per epoch)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, lr_drop), gamma=gamma)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of each named group: ``{"lr": main, "lr_backbone": ..., ...}``."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{i}")
        out["lr" if name == "main" else f"lr_{name}"] = float(group["lr"])
    return out
