"""The typed results of :func:`detrkit.explain.explain`: what the model computed, as tensors.

Conventions: one image (no batch dimension). Boxes are normalised cxcywh relative to the
unpadded model input (the same frame as :class:`~detrkit.structures.DetectorOutput`); points
are normalised ``(x, y)`` relative to the unpadded image unless a field says otherwise. ``Q``
matching queries, ``H`` heads, ``L`` feature levels, ``P`` sampling points per head and level,
``C`` class logits, ``S`` encoder tokens. Padding masks are True on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from detrkit.structures import DenoisingMeta, DetectorOutput

__all__ = [
    "PictureKind",
    "PICTURES",
    "Skipped",
    "DeformableSampling",
    "AttentionMap",
    "Trajectory",
    "Proposals",
    "DenoisingView",
    "Explanation",
]

PictureKind = Literal[
    "decoder_sampling",
    "encoder_sampling",
    "cross_attention",
    "encoder_attention",
    "trajectory",
    "proposals",
    "denoising_groups",
    "denoising_mask",
]
#: every picture ``detrkit explain`` can draw, in the order it writes them
PICTURES: tuple[PictureKind, ...] = (
    "decoder_sampling",
    "encoder_sampling",
    "cross_attention",
    "encoder_attention",
    "trajectory",
    "proposals",
    "denoising_groups",
    "denoising_mask",
)


@dataclass
class Skipped:
    """A picture that does not apply to the model, and why."""

    picture: PictureKind
    reason: str


@dataclass
class DeformableSampling:
    """Multi-scale deformable attention of some queries in one layer, as the operator used it.

    layer: index of the encoder / decoder layer. query_index: ``[N]`` which decoder queries
    (all of them) or encoder tokens (the one chosen by pixel) the rows are.
    locations: ``[N, H, L, P, 2]`` ``(x, y)`` sampling locations in the operator's frame
    (normalised to each level's *padded* size; values outside ``[0, 1]`` are allowed: the
    bilinear sampling reads zeros there). weights: ``[N, H, L, P]`` attention weights
    (softmax over ``L * P`` per head: each head's weights sum to 1).
    reference: ``[N, L, 2]`` points or ``[N, L, 4]`` boxes given to the operator (same frame).
    valid_ratios: ``[L, 2]`` ``(w, h)`` share of each level the image covers.
    spatial_shapes: ``(h_l, w_l)`` per level.
    """

    layer: int
    query_index: Tensor
    locations: Tensor
    weights: Tensor
    reference: Tensor
    valid_ratios: Tensor
    spatial_shapes: list[tuple[int, int]]

    def on_image(self) -> Tensor:
        """``[N, H, L, P, 2]`` the locations normalised to the unpadded image."""
        return self.locations / self.valid_ratios[None, None, :, None, :]


@dataclass
class AttentionMap:
    """Global attention of some queries over the flattened feature map, in one layer.

    layer: index of the layer. query_index: ``[N]`` decoder queries or the encoder token(s).
    weights: ``[N, H, S]`` softmax over the ``S`` tokens (padding tokens get 0).
    spatial_shapes: ``(h_l, w_l)`` per level (``S = sum h_l * w_l``). valid_sizes: ``(h, w)``
    of the unpadded part of each level.
    """

    layer: int
    query_index: Tensor
    weights: Tensor
    spatial_shapes: list[tuple[int, int]]
    valid_sizes: list[tuple[int, int]]

    def level_map(self, level: int = 0) -> Tensor:
        """``[N, H, h, w]`` the weights on the unpadded part of level ``level``."""
        start = sum(h * w for h, w in self.spatial_shapes[:level])
        h, w = self.spatial_shapes[level]
        vh, vw = self.valid_sizes[level]
        grid = self.weights[..., start : start + h * w].reshape(*self.weights.shape[:2], h, w)
        return grid[..., :vh, :vw]


@dataclass
class Trajectory:
    """The box of every query after every decoder layer.

    boxes: ``[L_dec, Q, 4]`` normalised cxcywh, first layer first; ``boxes[-1]`` is the
    model's output. logits: ``[L_dec, Q, C]``. initial: ``[Q, 2|4]`` the reference the first
    layer starts from (points, anchors or selected proposals), or None (learned queries).
    box_update: how a layer's box becomes the next layer's reference.
    """

    boxes: Tensor
    logits: Tensor
    initial: Tensor | None
    box_update: Literal["none", "refine", "look_forward_twice"]


@dataclass
class Proposals:
    """The encoder proposals chosen as decoder queries (two-stage / mixed query selection).

    kind: ``two_stage`` (ranked by the objectness logit, class 0) or ``mixed`` (by the best
    class logit). boxes: ``[Q, 4]`` the chosen proposals after the encoder box head (the
    decoder's initial references), best first as selected. anchors: ``[Q, 4]`` their anchor
    boxes before the box head. scores: ``[Q]`` the ranking logit. token_index: ``[Q]`` encoder
    token of each; level: ``[Q]`` its feature level. num_tokens: ``S`` (what was ranked).
    """

    kind: Literal["two_stage", "mixed"]
    boxes: Tensor
    anchors: Tensor
    scores: Tensor
    token_index: Tensor
    level: Tensor
    num_tokens: int


@dataclass
class DenoisingView:
    """One training-mode draw of the denoising queries and what the decoder did with them.

    source: where the ground truth came from (``given`` targets, or the model's own top
    ``predictions``). gt_boxes / gt_labels: ``[T, 4]`` normalised cxcywh / ``[T]``.
    noised_boxes / noised_labels: ``[M, 4]`` / ``[M]`` every noised copy (``M = G * T`` for
    dn, ``2 * G * T`` for cdn). slot_index / target_index / group: ``[M]`` its slot among the
    ``P`` denoising slots, its ground-truth box, its group. negative: ``[M]`` bool, a
    contrastive (negative) copy (cdn only). attn_mask: ``[P + Q, P + Q]`` bool, ``True`` =
    blocked, as the decoder's self-attention received it. reconstructed: ``[P, 4]`` the last
    layer's boxes of the denoising slots. meta: the :class:`DenoisingMeta` of the draw.
    """

    source: Literal["given", "predictions"]
    gt_boxes: Tensor
    gt_labels: Tensor
    noised_boxes: Tensor
    noised_labels: Tensor
    slot_index: Tensor
    target_index: Tensor
    group: Tensor
    negative: Tensor
    attn_mask: Tensor
    reconstructed: Tensor
    meta: DenoisingMeta


@dataclass
class Explanation:
    """Everything :func:`~detrkit.explain.explain` collected for one image.

    image_size: ``(h, w)`` of the image as given; input_size: ``(h, w)`` of the model input.
    output: the model's :class:`DetectorOutput` of the run (batch of one; ``aux`` filled).
    top_queries / scores / labels: ``[K]`` the best matching queries, best first, their score
    and class. pixel: ``(x, y)`` in image pixels of the encoder location shown; token: its
    encoder token (finest level). class_activation: ``softmax`` or ``sigmoid``.
    decoder_sampling / encoder_sampling: per layer (deformable attention).
    cross_attention / encoder_attention: per layer (global attention).
    trajectory, proposals, denoising: see their types (None where they do not apply).
    skipped: the pictures that do not apply to this model, with the reason.
    """

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    output: DetectorOutput
    top_queries: Tensor
    scores: Tensor
    labels: Tensor
    pixel: tuple[float, float]
    token: int
    class_activation: Literal["softmax", "sigmoid"]
    trajectory: Trajectory
    decoder_sampling: list[DeformableSampling] = field(default_factory=list)
    encoder_sampling: list[DeformableSampling] = field(default_factory=list)
    cross_attention: list[AttentionMap] = field(default_factory=list)
    encoder_attention: list[AttentionMap] = field(default_factory=list)
    proposals: Proposals | None = None
    denoising: DenoisingView | None = None
    skipped: list[Skipped] = field(default_factory=list)

    def applies(self, picture: PictureKind) -> bool:
        """Whether ``picture`` applies to the model (is not in :attr:`skipped`)."""
        return all(s.picture != picture for s in self.skipped)
