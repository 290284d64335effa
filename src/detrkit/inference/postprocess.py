"""From model outputs to :class:`~detrkit.structures.Detections` in absolute pixels.

* softmax models (DETR): softmax over the ``num_classes + 1`` logits, drop "no object", the
  best class of each query gives its score and label; one detection per query, in query order.
* sigmoid models: sigmoid scores flattened over ``(query, class)``, the ``num_select`` best
  pairs (descending score); label = flat index mod ``C``, query = flat index div ``C``.

Boxes are converted from normalised cxcywh to xyxy and multiplied by ``(w, h, w, h)`` of the
target size (not clipped). Pass the original image sizes to get boxes in the frame of the
dataset's annotations.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from detrkit.boxes import cxcywh_to_xyxy
from detrkit.config import Config
from detrkit.structures import Detections, DetectorOutput, LayerOutput

__all__ = ["PostProcessor", "build_postprocessor", "DEFAULT_NUM_SELECT"]

DEFAULT_NUM_SELECT = 100  # the official Deformable DETR value


class PostProcessor:
    """Turn logits ``[B, Q, C]`` and boxes ``[B, Q, 4]`` (normalised cxcywh) into detections.

    Args:
        class_activation: ``"softmax"`` (last logit = "no object") or ``"sigmoid"``.
        num_select: sigmoid only: detections kept per image (top-k over query-class pairs,
            capped at ``Q * C``); ``None`` = :data:`DEFAULT_NUM_SELECT`. Softmax models always
            return one detection per query and ignore it.
    """

    def __init__(
        self,
        class_activation: Literal["softmax", "sigmoid"] = "softmax",
        num_select: int | None = None,
    ) -> None:
        if class_activation not in ("softmax", "sigmoid"):
            raise ValueError(
                f"PostProcessor: class_activation must be 'softmax' or 'sigmoid', "
                f"got {class_activation!r}"
            )
        if num_select is not None and num_select < 1:
            raise ValueError(f"PostProcessor: num_select must be >= 1 or None, got {num_select}")
        self.class_activation = class_activation
        self.num_select = num_select

    def __repr__(self) -> str:
        return (
            f"PostProcessor(class_activation={self.class_activation!r}, "
            f"num_select={self.num_select})"
        )

    @torch.no_grad()
    def __call__(
        self, outputs: DetectorOutput | LayerOutput, target_sizes: Tensor
    ) -> list[Detections]:
        """Detections of every image.

        Args:
            outputs: logits ``[B, Q, C]`` and boxes ``[B, Q, 4]`` (normalised cxcywh) of the
                last decoder layer.
            target_sizes: ``[B, 2]`` ``(h, w)`` per image; boxes come back in that frame.

        Returns:
            ``B`` :class:`Detections`: boxes_xyxy ``[K, 4]`` absolute, scores ``[K]``,
            labels ``[K]`` (contiguous class indices), query_index ``[K]``.
        """
        logits = outputs.logits
        with torch.autocast(logits.device.type, enabled=False):
            sizes = torch.as_tensor(target_sizes, device=logits.device)
            if sizes.dim() != 2 or sizes.shape != (logits.shape[0], 2):
                raise ValueError(
                    f"PostProcessor: target_sizes must be [B, 2] (h, w) with "
                    f"B={logits.shape[0]}, got {tuple(sizes.shape)}"
                )
            scores, labels, boxes, query = self.batched(
                logits.float(), outputs.boxes.float(), sizes
            )
        return [Detections(boxes[b], scores[b], labels[b], query[b]) for b in range(len(scores))]

    def batched(
        self, logits: Tensor, boxes: Tensor, target_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The detections of a batch as tensors (traceable: the exported deploy graph uses it).

        Args:
            logits: ``[B, Q, C]``. boxes: ``[B, Q, 4]`` normalised cxcywh.
            target_sizes: ``[B, 2]`` ``(h, w)``.

        Returns:
            scores ``[B, K]``, labels ``[B, K]`` int64, boxes_xyxy ``[B, K, 4]`` absolute,
            query index ``[B, K]`` int64; ``K = Q`` (softmax, query order) or the top-k of the
            sigmoid scores (descending).
        """
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)  # [B, 4]
        boxes_xyxy = cxcywh_to_xyxy(boxes) * scale[:, None, :]  # [B, Q, 4]
        bsz, nq, ncls = logits.shape
        if self.class_activation == "softmax":
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]
            query = torch.arange(nq, device=logits.device).expand(bsz, nq)
            return scores, labels, boxes_xyxy, query
        k = min(self.num_select or DEFAULT_NUM_SELECT, nq * ncls)
        scores, flat = torch.topk(logits.sigmoid().flatten(1), k, dim=1)  # [B, K]
        query = torch.div(flat, ncls, rounding_mode="floor")  # [B, K]
        picked = torch.gather(boxes_xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))  # [B, K, 4]
        return scores, flat % ncls, picked, query


def build_postprocessor(cfg: Config) -> PostProcessor:
    """The post-processor of ``cfg.model.class_activation`` and ``cfg.postprocess.num_select``."""
    return PostProcessor(cfg.model.class_activation, cfg.postprocess.num_select)
