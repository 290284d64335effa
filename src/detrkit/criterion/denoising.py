"""Loss of the denoising queries (DN-DETR, DINO): each noised copy is supervised directly by
the target it was made from, no matching.

Terms per decoder layer (``<s>`` = ``""`` for the last layer, ``_0``, ``_1``, ... for the earlier
ones), named as in the official code bases:

* ``dn`` (DN-DETR): ``tgt_loss_ce<s>`` sigmoid focal loss of the ``N`` denoising entries
  against one-hot labels, summed over entries and classes, divided by ``N``; ``tgt_loss_bbox<s>``
  L1 / ``N``; ``tgt_loss_giou<s>`` ``(1 - GIoU)`` / ``N``; logging: ``tgt_class_error<s>``
  (100 - top-1 accuracy). Padding slots are ignored.
* ``cdn`` (DINO): ``loss_ce_dn<s>`` focal loss over *all* ``P`` slots (negatives and padding
  have all-zero targets), summed, divided by ``num_boxes * G``; ``loss_bbox_dn<s>`` /
  ``loss_giou_dn<s>`` over the positive copies, divided by ``num_boxes * G``; logging:
  ``loss_xy_dn<s>``, ``loss_hw_dn<s>`` and ``cardinality_error_dn<s>``.

``num_boxes`` is the criterion's normaliser (targets in the batch, averaged over processes,
clamped at 1). A batch without targets gives all-zero terms, so the set of names is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.boxes import cxcywh_to_xyxy, generalized_box_iou
from detrkit.criterion.focal import sigmoid_focal_loss
from detrkit.structures import DenoisingOutput, LayerOutput

__all__ = ["DenoisingLoss", "denoising_loss", "denoising_term_names"]


@dataclass
class DenoisingLoss:
    """total: scalar weighted sum (to add to the criterion's total). terms: every term by its
    official name (loss terms carry gradients; logging terms don't)."""

    total: Tensor
    terms: dict[str, Tensor]


def denoising_term_names(kind: str, num_layers: int) -> list[str]:
    """The term names :func:`denoising_loss` returns for ``num_layers`` supervised layers."""
    base = (
        ["tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou"]
        if kind == "dn"
        else [
            "loss_ce_dn",
            "loss_bbox_dn",
            "loss_giou_dn",
            "loss_xy_dn",
            "loss_hw_dn",
            "cardinality_error_dn",
        ]
    )
    suffixes = [""] + [f"_{i}" for i in range(num_layers - 1)]
    return [name + s for s in suffixes for name in base]


def _focal(logits: Tensor, onehot: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss (same shapes)."""
    # sigmoid_focal_loss reduces as mean over dim 1 then sum; undo the mean with the size
    return sigmoid_focal_loss(logits, onehot, 1.0, alpha, gamma) * logits.shape[1]


def _box_terms(
    pred: Tensor, target: Tensor, norm: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """L1 ``[M, 4]`` (un-reduced), summed L1 / norm, summed (1 - GIoU) / norm."""
    l1 = F.l1_loss(pred, target, reduction="none")
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), eps))
    return l1, l1.sum() / norm, (1 - giou).sum() / norm


def _dn_layer(
    layer: LayerOutput, dn: DenoisingOutput, alpha: float, gamma: float, eps: float
) -> dict[str, Tensor]:
    meta = dn.meta
    zero = layer.logits.new_zeros((), dtype=torch.float32)
    if meta.num_entries == 0:
        return {
            "tgt_loss_ce": zero,
            "tgt_class_error": zero.detach(),
            "tgt_loss_bbox": zero,
            "tgt_loss_giou": zero,
        }
    b, s = meta.batch_index.to(layer.logits.device), meta.slot_index.to(layer.logits.device)
    logits = layer.logits[b, s].float()  # [N, C]
    labels = meta.labels.to(logits.device)  # [N]
    boxes = meta.boxes.to(logits.device, torch.float32)  # [N, 4]
    n = float(meta.num_entries)
    onehot = F.one_hot(labels, logits.shape[-1] + 1)[:, :-1].to(logits.dtype)  # [N, C]
    terms = {"tgt_loss_ce": _focal(logits[None], onehot[None], alpha, gamma) / n}
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).float().sum()
        terms["tgt_class_error"] = 100 - correct * (100.0 / n)
    _, terms["tgt_loss_bbox"], terms["tgt_loss_giou"] = _box_terms(
        layer.boxes[b, s].float(), boxes, n, eps
    )
    return terms


def _cdn_layer(
    layer: LayerOutput,
    dn: DenoisingOutput,
    num_boxes: float,
    alpha: float,
    gamma: float,
    eps: float,
) -> dict[str, Tensor]:
    meta = dn.meta
    logits = layer.logits.float()  # [B, P, C]
    device = logits.device
    norm = num_boxes * meta.num_groups
    b, s = meta.batch_index.to(device), meta.slot_index.to(device)
    labels = meta.labels.to(device)
    onehot = torch.zeros(
        *logits.shape[:2], logits.shape[-1] + 1, dtype=logits.dtype, device=device
    )  # [B, P, C + 1]
    onehot[b, s, labels] = 1
    terms = {
        "loss_ce_dn": _focal(logits, onehot[..., :-1], alpha, gamma) / norm
        if logits.shape[1]
        else logits.sum() * 0
    }
    l1, terms["loss_bbox_dn"], terms["loss_giou_dn"] = _box_terms(
        layer.boxes[b, s].float(), meta.boxes.to(device, torch.float32), norm, eps
    )
    with torch.no_grad():
        terms["loss_xy_dn"] = l1[:, :2].sum() / norm
        terms["loss_hw_dn"] = l1[:, 2:].sum() / norm
        counts = torch.as_tensor(meta.num_targets, dtype=torch.float32, device=device)
        predicted = (
            (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            if logits.shape[1]
            else torch.zeros_like(counts)
        )
        terms["cardinality_error_dn"] = F.l1_loss(predicted, counts)
    return terms


def denoising_loss(
    dn: DenoisingOutput,
    num_boxes: float,
    class_weight: float = 1.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    aux_loss: bool = True,
    giou_eps: float = 1e-6,
) -> DenoisingLoss:
    """Loss of the denoising outputs ``dn`` (layout and naming from ``dn.meta.kind``; see the
    module docstring).

    Args:
        dn: per decoder layer ``logits [B, P, C]`` and ``boxes [B, P, 4]`` (normalised cxcywh)
            of the denoising slots, and their :class:`~detrkit.models.denoising.DenoisingMeta`.
        num_boxes: the criterion's normaliser (used by ``cdn`` only).
        class_weight / bbox_weight / giou_weight: coefficients in ``total``.
        focal_alpha / focal_gamma: focal loss parameters.
        aux_loss: also supervise the earlier decoder layers (``_0``, ``_1``, ... terms).
        giou_eps: added to union and enclosing area in the GIoU (1e-6 in the DN-DETR and DINO
            code bases).
    """
    kind = dn.meta.kind
    if kind not in ("dn", "cdn"):
        raise ValueError(f"denoising_loss: unknown denoising kind {kind!r}")
    layers = list(dn.layers) if aux_loss else list(dn.layers[-1:])
    ordered = [layers[-1]] + layers[:-1]  # last layer first (unsuffixed), then _0, _1, ...
    names = (
        ("tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou")
        if kind == "dn"
        else ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn")
    )
    weights = dict(zip(names, (class_weight, bbox_weight, giou_weight)))
    terms: dict[str, Tensor] = {}
    total = dn.layers[-1].logits.new_zeros((), dtype=torch.float32)
    for i, layer in enumerate(ordered):
        suffix = "" if i == 0 else f"_{i - 1}"
        if kind == "dn":
            layer_terms = _dn_layer(layer, dn, focal_alpha, focal_gamma, giou_eps)
        else:
            layer_terms = _cdn_layer(layer, dn, num_boxes, focal_alpha, focal_gamma, giou_eps)
        total = total + sum(layer_terms[k] * w for k, w in weights.items())
        terms.update({k + suffix: v for k, v in layer_terms.items()})
    return DenoisingLoss(total, terms)
