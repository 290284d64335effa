"""The sigmoid focal loss (Lin et al., 2017) as the DETR family reduces it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss of ``logits`` ``[B, Q, C]`` against 0/1 ``targets`` ``[B, Q, C]``: mean over
    queries, sum over images and classes, divided by ``num_boxes`` (a scalar)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes
