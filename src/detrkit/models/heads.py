"""Class and box heads of the decoder layers and of the encoder proposals.

A class head is ``nn.Linear(d, C)``, a box head a 3-layer :class:`MLP` ``d -> 4`` giving
offsets that :func:`~detrkit.models.embeddings.refine_boxes` applies to a reference. Sharing:
one head for every decoder layer or one per layer; the encoder proposals have their own heads
or use the (shared) decoder head. All heads start as copies of one initial head (as in the
official code), so per-layer heads start identical.
"""

from __future__ import annotations

import copy
import math

from torch import Tensor, nn

from detrkit.models.embeddings import MLP, refine_boxes
from detrkit.structures import LayerOutput

__all__ = ["prior_prob_bias", "Heads"]


def prior_prob_bias(prior_prob: float = 0.01) -> float:
    """The class-logit bias that makes every sigmoid score start at ``prior_prob``."""
    return -math.log((1 - prior_prob) / prior_prob)


class Heads(nn.Module):
    """The prediction heads.

    Args:
        hidden_dim: width ``d``. num_logits: class-head outputs (``C``; softmax models
            ``num_classes + 1``). num_layers: decoder layers ``L``.
        share_class / share_box: one head for every layer instead of one per layer.
        own_encoder: whether the encoder proposals get their own ``(class, box)`` head instead
            of the first decoder head (models without proposals: ``(False, False)``).
        sigmoid: class biases start at the focal-loss prior (0.01).
        relative: boxes are offsets from a reference: the last box layer starts at zero.
        small_first_box: the first layer's widths and heights start at ``sigmoid(-2)``
            (2-D reference points carry no size).
        eps: inverse-sigmoid clamp of the box refinement.

    State dict: ``class_embed.{i}``, ``bbox_embed.{i}`` (``i < 1`` when shared),
    ``enc_class_embed``, ``enc_bbox_embed``.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_logits: int,
        num_layers: int,
        share_class: bool,
        share_box: bool,
        own_encoder: tuple[bool, bool],
        sigmoid: bool,
        relative: bool,
        small_first_box: bool,
        eps: float,
    ) -> None:
        super().__init__()
        class_head = nn.Linear(hidden_dim, num_logits)
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        if sigmoid:
            nn.init.constant_(class_head.bias, prior_prob_bias())
        if relative:
            nn.init.constant_(box_head.layers[-1].weight, 0.0)
            nn.init.constant_(box_head.layers[-1].bias, 0.0)
        self.num_layers, self.eps = num_layers, eps
        self.class_embed = nn.ModuleList(
            copy.deepcopy(class_head) for _ in range(1 if share_class else num_layers)
        )
        self.bbox_embed = nn.ModuleList(
            copy.deepcopy(box_head) for _ in range(1 if share_box else num_layers)
        )
        if small_first_box:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        self.enc_class_embed = copy.deepcopy(class_head) if own_encoder[0] else None
        self.enc_bbox_embed = copy.deepcopy(box_head) if own_encoder[1] else None

    def layer(self, i: int) -> tuple[nn.Module, nn.Module]:
        """Class and box head of decoder layer ``i``."""
        return (
            self.class_embed[min(i, len(self.class_embed) - 1)],
            self.bbox_embed[min(i, len(self.bbox_embed) - 1)],
        )

    def box_heads(self) -> list[nn.Module]:
        """The box head of every decoder layer (the same module repeats when shared)."""
        return [self.layer(i)[1] for i in range(self.num_layers)]

    def encoder(self) -> tuple[nn.Module, nn.Module]:
        """Class and box head of the encoder proposals."""
        return (
            self.enc_class_embed if self.enc_class_embed is not None else self.class_embed[0],
            self.enc_bbox_embed if self.enc_bbox_embed is not None else self.bbox_embed[0],
        )

    def forward(self, hidden: Tensor, references: list[Tensor | None]) -> list[LayerOutput]:
        """Predictions of every decoder layer.

        Args:
            hidden: ``[L, B, N, d]`` decoder outputs (after the decoder norm, if any).
            references: ``L`` references ``[B, N, 2|4]`` normalised (or ``None``): the box
                each layer's offsets apply to.

        Returns:
            ``L`` :class:`LayerOutput`: logits ``[B, N, C]``, boxes ``[B, N, 4]`` normalised
            cxcywh.
        """
        out = []
        for i in range(hidden.shape[0]):
            class_head, box_head = self.layer(i)
            boxes = refine_boxes(box_head(hidden[i]), references[i], self.eps)
            out.append(LayerOutput(class_head(hidden[i]), boxes))
        return out
