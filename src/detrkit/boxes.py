"""Box format conversions and overlap measures.

``cxcywh`` = ``(cx, cy, w, h)``; ``xyxy`` = ``(x0, y0, x1, y1)``. These functions do not care
whether boxes are normalised or absolute: they keep whatever units they are given.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area

__all__ = ["cxcywh_to_xyxy", "xyxy_to_cxcywh", "box_iou", "generalized_box_iou", "inverse_sigmoid"]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` cxcywh -> ``[..., 4]`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``[..., 4]`` cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes ``[N, 4]``, ``[M, 4]`` -> ``[N, M]``, ``[N, M]``.
    ``eps`` is added to the union (DAB-DETR / DN-DETR / DINO: 1e-6; DETR: 0)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / (union + eps), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes ``[N, 4]``, ``[M, 4]`` -> ``[N, M]``.
    ``eps`` is added to the union and to the enclosing area (DAB-DETR / DN-DETR / DINO: 1e-6;
    DETR / Deformable DETR: 0).

    Degenerate boxes (x1 < x0 or y1 < y0) raise: they would give NaN or meaningless costs.
    """
    if not (boxes1[:, 2:] >= boxes1[:, :2]).all() or not (boxes2[:, 2:] >= boxes2[:, :2]).all():
        raise ValueError("generalized_box_iou: boxes must be xyxy with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(boxes1, boxes2, eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / (area + eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to ``[0, 1]``; both sides clamped at ``eps`` (1e-5 Deformable, 1e-3 DAB/DN/DINO)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)
