"""The contract between :class:`~detrkit.models.detector.Detector` and its transformer part.

The detector owns what every DETR-family model shares (backbone, neck, position encodings);
everything after that (encoder, queries, decoder, per-layer heads, denoising, two-stage
proposals) is one *transformer part*, a subclass of :class:`DetectionTransformer`. Heads live
inside it because iterative box refinement needs per-layer heads inside the decoder loop.
"""

from __future__ import annotations

from torch import Tensor, nn

from detrkit.structures import DetectorOutput, Target

__all__ = ["DetectionTransformer"]


class DetectionTransformer(nn.Module):
    """Base class of the transformer parts (DETR, Deformable DETR, DAB/DN-DETR, DINO).

    Subclasses implement :meth:`forward` and set:

    * ``hidden_dim``: the width ``d`` of the feature maps they accept;
    * ``num_levels``: how many feature levels they expect (DETR 1).

    The decoder's class head has ``num_classes + 1`` outputs for softmax models (last =
    "no object") and ``num_classes`` for sigmoid models; the detector does not look inside.
    """

    hidden_dim: int
    num_levels: int

    def forward(  # pragma: no cover - interface
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos: list[Tensor],
        targets: list[Target] | None = None,
    ) -> DetectorOutput:
        """Run encoder, decoder and heads on the projected feature levels.

        Args:
            srcs: ``num_levels`` maps ``[B, d, h_l, w_l]`` (finest first).
            masks: ``num_levels`` bool masks ``[B, h_l, w_l]``, ``True`` = padding.
            pos: ``num_levels`` position encodings ``[B, d, h_l, w_l]`` (dtype of ``srcs``).
            targets: ground truth, used only by training-time denoising; ``None`` otherwise.

        Returns:
            :class:`DetectorOutput`: ``logits`` ``[B, Q, C]`` and ``boxes`` ``[B, Q, 4]``
            (normalised cxcywh, sigmoid applied) of the last decoder layer; ``aux``: the earlier
            layers, first layer first (always filled; the detector drops them when
            ``aux_loss`` is off); ``enc``: encoder proposals (two-stage) or ``None``; ``dn``:
            denoising outputs (training with denoising) or ``None``.
        """
        raise NotImplementedError
