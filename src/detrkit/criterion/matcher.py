"""Hungarian matching of predictions to ground-truth boxes (one-to-one, per image).

The procedure is the one shared by DETR, Deformable DETR, DAB-DETR, DN-DETR and DINO:

1. flatten the batch: class probabilities ``[B*Q, C]``, boxes ``[B*Q, 4]``; concatenate the
   targets of all images: labels ``[T]``, boxes ``[T, 4]``;
2. class cost ``[B*Q, T]``: ``-softmax(logits)[:, label]`` (DETR) or the focal cost
   ``alpha (1-p)^g (-log(p + 1e-8)) - (1-alpha) p^g (-log(1-p + 1e-8))`` with
   ``p = sigmoid(logit)`` at the label column (all the others);
3. box cost: L1 distance of the normalised cxcywh vectors;
4. GIoU cost: minus the generalised IoU of the boxes in xyxy;
5. ``C = cost_bbox * L1 + cost_class * class + cost_giou * GIoU`` in float32, reshaped to
   ``[B, Q, T]``; image ``b`` solves the rectangular assignment of its own ``Q x T_b`` block
   with :func:`scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detrkit.boxes import cxcywh_to_xyxy, generalized_box_iou
from detrkit.structures import Target

__all__ = ["HungarianMatcher", "MatchIndices", "target_fields"]

# per image: (query indices sorted ascending, target indices), both int64 on the CPU
MatchIndices = list[tuple[Tensor, Tensor]]
TargetLike = Target | tuple[Tensor, Tensor]


def target_fields(target: TargetLike) -> tuple[Tensor, Tensor]:
    """``(labels [N] int64, boxes_cxcywh [N, 4])`` of a :class:`Target` or a
    ``(labels, boxes)`` pair."""
    if isinstance(target, Target):
        return target.labels, target.boxes
    if isinstance(target, (tuple, list)) and len(target) == 2:
        labels, boxes = target
        return labels, boxes
    raise TypeError(
        f"a target must be a detrkit.structures.Target or a (labels, boxes) pair, "
        f"got {type(target).__name__}"
    )


def _empty_match() -> tuple[Tensor, Tensor]:
    return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))


class HungarianMatcher:
    """Optimal one-to-one assignment between queries and the ground truth of each image.

    Args:
        cost_class / cost_bbox / cost_giou: weights of the class, L1 box and GIoU costs
            (official: DETR 1 / 5 / 2, the sigmoid models 2 / 5 / 2).
        class_cost: ``"softmax"`` (logits ``[.., num_classes + 1]``, last = "no object") or
            ``"focal"`` (sigmoid logits ``[.., num_classes]``).
        focal_alpha / focal_gamma: parameters of the focal class cost.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: Literal["softmax", "focal"] = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if class_cost not in ("softmax", "focal"):
            raise ValueError(
                f"HungarianMatcher: class_cost must be 'softmax' or 'focal', got {class_cost!r}"
            )
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: all costs are 0; set at least one of "
                "cost_class, cost_bbox, cost_giou"
            )
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.class_cost = class_cost
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, class_cost={self.class_cost!r})"
        )

    def class_cost_matrix(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Class cost ``[N, T]`` of flattened logits ``[N, C]`` against target labels ``[T]``."""
        if self.class_cost == "softmax":
            prob = logits.softmax(-1)  # [N, C]
            return -prob[:, labels]
        prob = logits.sigmoid()  # [N, C]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        return pos[:, labels] - neg[:, labels]

    @torch.no_grad()
    def cost_matrix(
        self, logits: Tensor, boxes_cxcywh: Tensor, labels: Tensor, target_boxes: Tensor
    ) -> Tensor:
        """Total cost ``[B, Q, T]`` (float32) of all queries against all ``T`` targets of the batch.

        logits ``[B, Q, C]``; boxes_cxcywh ``[B, Q, 4]`` and target_boxes ``[T, 4]``
        normalised cxcywh; labels ``[T]`` int64.
        """
        bsz, nq = logits.shape[:2]
        with torch.autocast(logits.device.type, enabled=False):
            out_logits = logits.flatten(0, 1).float()  # [B*Q, C]
            out_boxes = boxes_cxcywh.flatten(0, 1).float()  # [B*Q, 4]
            tgt_boxes = target_boxes.to(out_boxes)
            labels = labels.to(out_logits.device, torch.int64)
            cost_cls = self.class_cost_matrix(out_logits, labels)  # [B*Q, T]
            cost_l1 = torch.cdist(out_boxes, tgt_boxes, p=1)  # [B*Q, T]
            cost_giou = -generalized_box_iou(
                cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes)
            )  # [B*Q, T]
            cost = (
                self.cost_bbox * cost_l1 + self.cost_class * cost_cls + self.cost_giou * cost_giou
            )
        return cost.view(bsz, nq, -1)

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes_cxcywh: Tensor, targets: Sequence[TargetLike]
    ) -> MatchIndices:
        """Match the queries of every image to its targets.

        Args:
            logits: ``[B, Q, C]`` class logits.
            boxes_cxcywh: ``[B, Q, 4]`` predicted boxes, normalised cxcywh.
            targets: ``B`` :class:`Target` (or ``(labels [N], boxes_cxcywh [N, 4])`` pairs).

        Returns:
            per image ``(query_idx, target_idx)``: int64 CPU tensors of length
            ``min(Q, N_b)``, ``query_idx`` sorted ascending. Images without targets get
            empty tensors.
        """
        if (
            logits.dim() != 3
            or boxes_cxcywh.shape[:2] != logits.shape[:2]
            or boxes_cxcywh.shape[-1] != 4
        ):
            raise ValueError(
                f"HungarianMatcher: expected logits [B, Q, C] and boxes [B, Q, 4], "
                f"got {tuple(logits.shape)} and {tuple(boxes_cxcywh.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} images"
            )
        fields = [target_fields(t) for t in targets]
        sizes = [int(labels.shape[0]) for labels, _ in fields]
        if sum(sizes) == 0:
            return [_empty_match() for _ in sizes]
        labels = torch.cat([lab.reshape(-1) for lab, _ in fields])  # [T]
        tgt_boxes = torch.cat([box.reshape(-1, 4) for _, box in fields])  # [T, 4]
        cost = self.cost_matrix(logits, boxes_cxcywh, labels, tgt_boxes).cpu()  # [B, Q, T]
        if not torch.isfinite(cost).all():
            raise ValueError(
                "HungarianMatcher: the cost matrix holds NaN/inf; the predictions "
                "are not finite (diverged training? lower train.lr or use amp=none)"
            )
        indices: MatchIndices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[b] == 0:
                indices.append(_empty_match())
                continue
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
