"""The set criterion: Hungarian matching, then class and box losses for every decoder layer.

Terms (official names; ``<s>`` = ``""`` for the last layer, ``_0``, ``_1``, ... for the
earlier layers, ``_enc`` / ``_interm`` for the encoder proposals):

* ``loss_ce<s>``: softmax cross-entropy over all queries with "no object" weight
  ``eos_coef`` (DETR), or the sigmoid focal loss against one-hot targets, averaged over
  queries, summed, divided by ``num_boxes`` and multiplied by ``Q`` (all the others);
* ``loss_bbox<s>``: L1 of matched normalised cxcywh boxes, summed / ``num_boxes``;
* ``loss_giou<s>``: ``1 - GIoU`` of matched boxes, summed / ``num_boxes``;
* logging only: ``class_error`` (last layer: 100 - top-1 accuracy of the matched queries),
  ``cardinality_error<s>`` (|number of queries whose argmax is not the last logit - number
  of targets|, averaged over images: the official definition, kept for all models),
  optionally ``loss_xy<s>`` / ``loss_hw<s>`` (the L1 term split into centre and size).

``num_boxes`` is the number of target boxes in the batch, clamped at 1, the same for every
layer; a multi-process training step passes the count averaged over its processes instead
(:func:`detrkit.engine.distributed.mean_over_processes`), as the official implementations do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.boxes import cxcywh_to_xyxy, generalized_box_iou
from detrkit.config import Config
from detrkit.criterion.denoising import denoising_loss
from detrkit.criterion.focal import sigmoid_focal_loss
from detrkit.criterion.matcher import HungarianMatcher, MatchIndices
from detrkit.structures import DenoisingOutput, DetectorOutput, LayerOutput, Target

__all__ = ["LossOutput", "SetCriterion", "build_criterion"]


@dataclass
class LossOutput:
    """What :class:`SetCriterion` returns.

    total: scalar, the weighted sum of the loss terms (what to back-propagate).
    terms: every term by its official name (loss terms carry gradients; logging terms don't).
    indices: the matcher's result per call, keyed ``final``, ``aux_0``, ... and the encoder
        name (``enc`` / ``interm``); per image ``(query_idx, target_idx)``.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    indices: dict[str, MatchIndices] = field(default_factory=dict)


def _src_permutation(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(batch_idx, query_idx)`` of all matched queries, image by image."""
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


class SetCriterion(nn.Module):
    """Matching-based detection loss of a :class:`~detrkit.structures.DetectorOutput`.

    Args:
        num_classes: number of real classes (softmax logits have ``num_classes + 1`` columns,
            sigmoid logits ``num_classes``).
        matcher: the :class:`HungarianMatcher` (the same for every layer).
        class_loss: ``"ce"`` (softmax cross-entropy) or ``"focal"`` (sigmoid focal loss).
        class_weight / bbox_weight / giou_weight: coefficients of ``loss_ce`` /
            ``loss_bbox`` / ``loss_giou`` in ``total`` (the same for every layer).
        eos_coef: cross-entropy weight of the "no object" class.
        focal_alpha / focal_gamma: focal loss parameters.
        aux_loss: supervise ``outputs.aux`` (the earlier decoder layers).
        enc_name: suffix and ``indices`` key of the encoder-proposal terms: ``"enc"``
            (two-stage Deformable DETR) or ``"interm"`` (DINO).
        enc_class_agnostic: match and classify the encoder proposals against label 0 for
            every target (two-stage Deformable DETR) instead of the real labels (DINO).
        log_xy_hw: also report ``loss_xy`` / ``loss_hw`` (logging only; DAB-DETR, DINO).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_loss: Literal["ce", "focal"] = "ce",
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        enc_class_agnostic: bool = True,
        enc_name: str = "enc",
        aux_loss: bool = True,
        log_xy_hw: bool = False,
    ) -> None:
        super().__init__()
        if class_loss not in ("ce", "focal"):
            raise ValueError(
                f"SetCriterion: class_loss must be 'ce' or 'focal', got {class_loss!r}"
            )
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_loss = class_loss
        self.class_weight = float(class_weight)
        self.bbox_weight = float(bbox_weight)
        self.giou_weight = float(giou_weight)
        self.eos_coef = float(eos_coef)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.enc_class_agnostic = enc_class_agnostic
        self.enc_name = enc_name
        self.aux_loss = aux_loss
        self.log_xy_hw = log_xy_hw
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)  # [num_classes + 1]

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_loss={self.class_loss!r}, "
            f"weights=(class {self.class_weight}, bbox {self.bbox_weight}, "
            f"giou {self.giou_weight}), enc_name={self.enc_name!r}"
        )

    @property
    def weight_dict(self) -> dict[str, float]:
        """Coefficient of each weighted term (unsuffixed; aux / encoder terms use the same)."""
        return {
            "loss_ce": self.class_weight,
            "loss_bbox": self.bbox_weight,
            "loss_giou": self.giou_weight,
        }

    # ------------------------------------------------------------------ entry point

    def forward(
        self, outputs: DetectorOutput, targets: list[Target], num_boxes: float | None = None
    ) -> LossOutput:
        """Compute every term; all computation is float32 (autocast is switched off inside).

        Args:
            outputs: model output; logits ``[B, Q, C]``, boxes ``[B, Q, 4]`` normalised cxcywh.
            targets: ``B`` targets, boxes ``[N, 4]`` normalised cxcywh, labels ``[N]`` int64.
            num_boxes: normaliser of the box and focal terms; default: the targets' box count.
                Clamped at 1.
        """
        device = outputs.logits.device
        with torch.autocast(device.type, enabled=False):
            return self._forward(outputs, targets, device, num_boxes)

    def _forward(
        self,
        outputs: DetectorOutput,
        targets: list[Target],
        device: torch.device,
        num_boxes: float | None,
    ) -> LossOutput:
        if len(targets) != outputs.logits.shape[0]:
            raise ValueError(
                f"SetCriterion: {len(targets)} targets for a batch of "
                f"{outputs.logits.shape[0]} images"
            )
        labels = [t.labels.to(device, torch.int64).reshape(-1) for t in targets]
        every = torch.cat(labels)  # [T]
        if every.numel() and (int(every.min()) < 0 or int(every.max()) >= self.num_classes):
            raise ValueError(
                f"SetCriterion: target labels must lie in [0, {self.num_classes}) (contiguous "
                f"class indices), got {sorted(set(every.tolist()))}; check model.num_classes "
                "against the dataset's label map"
            )
        boxes = [t.boxes.to(device, torch.float32).reshape(-1, 4) for t in targets]
        if num_boxes is None:
            num_boxes = float(sum(int(lab.shape[0]) for lab in labels))
        num_boxes = max(num_boxes, 1.0)

        layers: list[tuple[str, str, LayerOutput, list[Tensor], bool]] = [
            ("final", "", outputs.final, labels, True)
        ]
        if self.aux_loss:
            layers += [
                (f"aux_{i}", f"_{i}", aux, labels, False) for i, aux in enumerate(outputs.aux)
            ]
        if outputs.enc is not None:
            enc_labels = (
                [torch.zeros_like(lab) for lab in labels] if self.enc_class_agnostic else labels
            )
            layers.append((self.enc_name, f"_{self.enc_name}", outputs.enc, enc_labels, False))

        terms: dict[str, Tensor] = {}
        indices: dict[str, MatchIndices] = {}
        total = outputs.logits.new_zeros((), dtype=torch.float32)
        for key, suffix, layer, layer_labels, log in layers:
            logits = layer.logits.float()  # [B, Q, C]
            pred_boxes = layer.boxes.float()  # [B, Q, 4]
            self._check_logits(logits, key)
            match = self.matcher(logits, pred_boxes, list(zip(layer_labels, boxes)))
            indices[key] = match
            layer_terms = self.layer_terms(
                logits, pred_boxes, layer_labels, boxes, match, num_boxes, log=log
            )
            total = total + self.weighted_sum(layer_terms)
            terms.update({name + suffix: value for name, value in layer_terms.items()})

        # EXTENSION POINT, denoising (DN-DETR / DINO): the denoising queries are supervised
        # directly by the targets they were made from, without matching (denoising_terms)
        if outputs.dn is not None:
            dn_total, dn_terms = self.denoising_terms(outputs.dn, targets, num_boxes)
            total = total + dn_total
            terms.update(dn_terms)
        return LossOutput(total=total, terms=terms, indices=indices)

    # ------------------------------------------------------------------ pieces

    def weighted_sum(self, layer_terms: dict[str, Tensor]) -> Tensor:
        """``class_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou``."""
        weights = self.weight_dict
        return sum(
            layer_terms[name] * w  # type: ignore[return-value]
            for name, w in weights.items()
        )

    def layer_terms(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        labels: list[Tensor],
        boxes: list[Tensor],
        indices: MatchIndices,
        num_boxes: float,
        log: bool = False,
    ) -> dict[str, Tensor]:
        """All terms of one layer (unsuffixed names).

        logits ``[B, Q, C]``; pred_boxes ``[B, Q, 4]`` and ``boxes`` (per image ``[N_b, 4]``)
        normalised cxcywh; labels per image ``[N_b]``; ``log`` adds ``class_error``.
        """
        terms: dict[str, Tensor] = {}
        batch_idx, src_idx = _src_permutation(indices, logits.device)
        matched_labels = torch.cat(
            [lab[tgt.to(lab.device)] for lab, (_, tgt) in zip(labels, indices)]
        )  # [M]
        terms["loss_ce"] = self._class_loss(logits, batch_idx, src_idx, matched_labels, num_boxes)
        if log:
            terms["class_error"] = self._class_error(
                logits[batch_idx, src_idx].detach(), matched_labels
            )
        src_boxes = pred_boxes[batch_idx, src_idx]  # [M, 4]
        tgt_boxes = torch.cat(
            [box[tgt.to(box.device)] for box, (_, tgt) in zip(boxes, indices)]
        )  # [M, 4]
        l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="none")  # [M, 4]
        terms["loss_bbox"] = l1.sum() / num_boxes
        giou = torch.diag(
            generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes))
        )  # [M]
        terms["loss_giou"] = (1 - giou).sum() / num_boxes
        if self.log_xy_hw:
            with torch.no_grad():
                terms["loss_xy"] = l1[:, :2].sum() / num_boxes
                terms["loss_hw"] = l1[:, 2:].sum() / num_boxes
        terms["cardinality_error"] = self._cardinality_error(logits.detach(), labels)
        return terms

    def _check_logits(self, logits: Tensor, key: str) -> None:
        expected = self.num_classes + 1 if self.class_loss == "ce" else self.num_classes
        if logits.shape[-1] != expected:
            raise ValueError(
                f"SetCriterion ({key}): logits have {logits.shape[-1]} classes but "
                f"class_loss={self.class_loss!r} with num_classes={self.num_classes} needs "
                f"{expected}; check model.num_classes / model.class_activation"
            )

    def _class_loss(
        self,
        logits: Tensor,
        batch_idx: Tensor,
        src_idx: Tensor,
        matched_labels: Tensor,
        num_boxes: float,
    ) -> Tensor:
        bsz, nq, ncls = logits.shape
        if self.class_loss == "ce":
            target = torch.full(
                (bsz, nq), self.num_classes, dtype=torch.int64, device=logits.device
            )  # [B, Q], unmatched = "no object"
            target[batch_idx, src_idx] = matched_labels
            return F.cross_entropy(
                logits.transpose(1, 2), target, self.empty_weight.to(logits.device)
            )
        onehot = torch.zeros((bsz, nq, ncls + 1), dtype=logits.dtype, device=logits.device)
        onehot[batch_idx, src_idx, matched_labels] = 1
        onehot = onehot[..., :-1]  # [B, Q, C], unmatched rows all zero
        return (
            sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma) * nq
        )

    @staticmethod
    @torch.no_grad()
    def _class_error(matched_logits: Tensor, matched_labels: Tensor) -> Tensor:
        """100 - top-1 accuracy (%) of ``[M, C]`` logits; 100 when nothing is matched."""
        if matched_labels.numel() == 0:
            return torch.full((), 100.0, device=matched_logits.device)
        correct = (matched_logits.argmax(-1) == matched_labels).float().sum()
        return 100 - correct * (100.0 / matched_labels.shape[0])

    @staticmethod
    @torch.no_grad()
    def _cardinality_error(logits: Tensor, labels: list[Tensor]) -> Tensor:
        """Mean over images of |#queries whose argmax is not the last column - #targets|."""
        counts = torch.as_tensor([float(lab.shape[0]) for lab in labels], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # [B]
        return F.l1_loss(predicted, counts)

    # ------------------------------------------------------------------ denoising (extension point)

    def denoising_terms(
        self, dn: DenoisingOutput, targets: list[Target], num_boxes: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of the denoising queries (DN-DETR / DINO), supervised directly by the targets
        they were made from, without matching. Returns ``(weighted sum, terms)``; the terms
        are merged into :attr:`LossOutput.terms` and the sum into ``total``.
        """
        result = denoising_loss(
            dn,
            num_boxes,
            class_weight=self.class_weight,
            bbox_weight=self.bbox_weight,
            giou_weight=self.giou_weight,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            aux_loss=self.aux_loss,
        )
        return result.total, result.terms


def build_criterion(cfg: Config) -> SetCriterion:
    """The criterion described by ``cfg.loss`` and ``cfg.model`` (classes, aux loss, encoder
    proposals: ``two_stage`` -> class-agnostic ``_enc`` terms, ``mixed`` -> ``_interm`` terms
    with real labels)."""
    loss, model = cfg.loss, cfg.model
    matcher = HungarianMatcher(
        cost_class=loss.matcher.cost_class,
        cost_bbox=loss.matcher.cost_bbox,
        cost_giou=loss.matcher.cost_giou,
        class_cost="softmax" if loss.class_loss == "ce" else "focal",
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
    )
    mixed = model.queries.kind == "mixed"
    return SetCriterion(
        num_classes=model.num_classes,
        matcher=matcher,
        class_loss=loss.class_loss,
        class_weight=loss.class_weight,
        bbox_weight=loss.bbox_weight,
        giou_weight=loss.giou_weight,
        eos_coef=loss.eos_coef,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        enc_class_agnostic=not mixed,
        enc_name="interm" if mixed else "enc",
        aux_loss=model.aux_loss,
        log_xy_hw=loss.log_xy_hw,
    )
