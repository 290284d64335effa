"""The Deformable DETR transformer part (Zhu et al., 2021): multi-scale deformable encoder,
learned or two-stage queries, deformable decoder with optional iterative box refinement,
per-layer class / box heads.

Data flow (``B`` images, ``L`` levels, ``S = sum(h_l * w_l)`` tokens, ``Q`` queries)::

    srcs [B,d,h_l,w_l], masks [B,h_l,w_l], pos [B,d,h_l,w_l]
      -> flatten: tokens [B,S,d], padding [B,S], pos + level_embed[l] [B,S,d], valid ratios [B,L,2]
      -> encoder: memory [B,S,d]
      -> queries: reference_points: query_embed [Q,2d] = (query_pos | tgt), reference
                  points sigmoid(Linear(query_pos)) [B,Q,2]
                  two_stage: per-token proposals [B,S,4] -> top-Q boxes [B,Q,4] -> sine
                  embedding -> (query_pos | tgt)
      -> decoder: hidden [L_dec,B,Q,d] and the reference each layer used
      -> heads:   logits [B,Q,C], boxes sigmoid(delta + inverse_sigmoid(reference)) [B,Q,4]

State dict below ``transformer.`` (official names unless noted): ``level_embed`` ``[L, d]``,
``encoder.layers.{i}.*``, ``decoder.layers.{i}.*``, ``query_embed.weight`` ``[Q, 2d]``
(official: top-level ``query_embed``) and ``reference_points`` (not with two-stage),
``class_embed.{i}`` / ``bbox_embed.{i}`` (official: top-level; without refinement one shared
head ``.0``, with refinement one per decoder layer), two-stage: ``two_stage_queries.enc_output``,
``.enc_output_norm``, ``.pos_trans``, ``.pos_trans_norm``
(official: directly under ``transformer.``) and, with refinement, the encoder heads
``enc_class_embed`` / ``enc_bbox_embed`` (official: the extra last ``class_embed`` /
``bbox_embed`` entry).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from detrkit.models.deformable_decoder import (
    REFINE_EPS,
    DeformableDecoder,
    DeformableDecoderLayer,
    refine_reference,
)
from detrkit.models.deformable_encoder import (DeformableEncoder, DeformableEncoderLayer,
                                               flatten_levels)
from detrkit.models.encoder import Activation
from detrkit.models.heads import MLP, init_class_head, zero_init_last_layer
from detrkit.models.interface import DetectionTransformer
from detrkit.models.queries import TwoStageQueries
from detrkit.ops.msda import Backend, MSDeformAttn
from detrkit.structures import DetectorOutput, LayerOutput, Target

__all__ = ["DeformableTransformer"]

QueryKind = Literal["reference_points", "two_stage"]
BoxUpdate = Literal["none", "refine", "look_forward_twice"]


class DeformableTransformer(DetectionTransformer):
    """Deformable DETR after the neck.

    Args:
        hidden_dim: width ``d``. nheads: attention heads (encoder, decoder self- and
            cross-attention).
        enc_layers / dec_layers: number of encoder / decoder layers (``dec_layers >= 1``).
        dim_feedforward: FFN width. dropout: dropout probability. activation: FFN activation.
        num_feature_levels: ``L``, the number of maps the neck delivers.
        enc_n_points / dec_n_points: sampling points per head and level.
        num_queries: ``Q`` (two-stage: the number of proposals kept).
        num_logits: class-head outputs (``num_classes`` for sigmoid models).
        sigmoid: the logits are used with a sigmoid: class biases start at the focal prior.
        query_kind: ``reference_points``: learned ``query_embed`` ``[Q, 2d]`` split into
            positional and content halves, 2-D reference points from the positional half.
            ``two_stage``: the top-``Q`` encoder proposals (by class-0 logit) give the initial
            boxes and, via a sine embedding, the queries.
        box_update: ``none``: one head shared by all decoder layers, references fixed.
            ``refine``: one head per layer; each layer refines the previous boxes.
            ``look_forward_twice``: as ``refine``, but layer ``i``'s boxes are computed from
            layer ``i - 1``'s refined boxes before they are detached (DINO).
        msda_backend: multi-scale deformable attention backend (``auto``: Triton on CUDA
            when available, the PyTorch reference otherwise).
        select_valid_proposals: two-stage only, see :class:`TwoStageQueries`
            (``select_valid_only``); ``False`` = the official behaviour.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: Activation = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        num_queries: int = 300,
        num_logits: int = 91,
        sigmoid: bool = True,
        query_kind: QueryKind = "reference_points",
        box_update: BoxUpdate = "none",
        msda_backend: Backend = "auto",
        select_valid_proposals: bool = True,
    ) -> None:
        super().__init__()
        if query_kind not in ("reference_points", "two_stage"):
            raise ValueError(f"model.queries.kind: Deformable DETR supports 'reference_points' "
                             f"or 'two_stage', got '{query_kind}'")
        if box_update not in ("none", "refine", "look_forward_twice"):
            raise ValueError(f"model.queries.box_update: expected 'none', 'refine' or "
                             f"'look_forward_twice', got '{box_update}'")
        if dec_layers < 1:
            raise ValueError(f"model.transformer.dec_layers: must be >= 1, got {dec_layers}")
        self.hidden_dim = hidden_dim
        self.num_levels = num_feature_levels
        self.num_queries = num_queries
        self.two_stage = query_kind == "two_stage"
        self.refine = box_update != "none"
        self.look_forward_twice = box_update == "look_forward_twice"

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        enc_layer = DeformableEncoderLayer(hidden_dim, dim_feedforward, dropout, activation,
                                           num_feature_levels, nheads, enc_n_points, msda_backend)
        dec_layer = DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, activation,
                                           num_feature_levels, nheads, dec_n_points, msda_backend)
        self.encoder = DeformableEncoder(enc_layer, enc_layers)
        self.decoder = DeformableDecoder(dec_layer, dec_layers)
        self.two_stage_queries: TwoStageQueries | None = None
        self.query_embed: nn.Embedding | None = None
        self.reference_points: nn.Linear | None = None
        if self.two_stage:
            self.two_stage_queries = TwoStageQueries(hidden_dim, num_queries,
                                                     select_valid_only=select_valid_proposals)
        else:
            self.reference_points = nn.Linear(hidden_dim, 2)
        self._init_transformer()
        if not self.two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)

        # heads: built once and copied, so that per-layer heads start identical (official)
        class_head = nn.Linear(hidden_dim, num_logits)
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        if sigmoid:
            init_class_head(class_head)
        zero_init_last_layer(box_head)
        num_heads = dec_layers if self.refine else 1
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads))
        self.enc_class_embed: nn.Linear | None = None
        self.enc_bbox_embed: MLP | None = None
        if self.two_stage and self.refine:
            self.enc_class_embed = copy.deepcopy(class_head)
            self.enc_bbox_embed = copy.deepcopy(box_head)
        if not self.two_stage:
            # the first box (from a 2-D reference point) starts small: sigmoid(-2) ~ 0.12
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def _init_transformer(self) -> None:
        """Official initialisation of the encoder, decoder and query / proposal layers."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def _heads(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """Class and box head of decoder layer ``layer``."""
        i = layer if self.refine else 0
        return self.class_embed[i], self.bbox_embed[i]

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos: list[Tensor],
        targets: list[Target] | None = None,
    ) -> DetectorOutput:
        """See :meth:`DetectionTransformer.forward`: ``L`` maps ``[B, d, h_l, w_l]`` with masks
        ``[B, h_l, w_l]`` (True = padding) and position encodings ``[B, d, h_l, w_l]``.
        ``targets`` is unused.

        Returns:
            :class:`DetectorOutput`: ``logits`` ``[B, Q, C]``, ``boxes`` ``[B, Q, 4]``
            (normalised cxcywh) of the last decoder layer, ``aux`` the earlier layers and, for
            two-stage, ``enc`` with logits ``[B, S, C]`` and boxes ``[B, S, 4]`` of every
            encoder token (sigmoid; invalid / padding tokens have boxes exactly 1.0).
        """
        flat = flatten_levels(srcs, masks, pos, self.level_embed)
        tokens, padding, spatial_shapes = flat.tokens, flat.padding, flat.spatial_shapes
        level_start_index, valid_ratios = flat.level_start_index, flat.valid_ratios
        memory = self.encoder(tokens, flat.pos, spatial_shapes, level_start_index,
                              valid_ratios, padding)  # [B, S, d]

        enc: LayerOutput | None = None
        if self.two_stage_queries is not None:
            features, proposals, invalid = self.two_stage_queries.proposals(
                memory, padding, spatial_shapes)  # [B, S, d], [B, S, 4], [B, S]
            enc_class = self.enc_class_embed if self.refine else self.class_embed[0]
            enc_box = self.enc_bbox_embed if self.refine else self.bbox_embed[0]
            enc_logits = enc_class(features)  # [B, S, C]
            enc_boxes_unact = enc_box(features) + proposals  # [B, S, 4]
            enc = LayerOutput(enc_logits, enc_boxes_unact.sigmoid())
            boxes_unact = self.two_stage_queries.select(enc_logits, enc_boxes_unact, invalid)
            reference = boxes_unact.sigmoid()  # [B, Q, 4]
            query_pos, tgt = self.two_stage_queries.queries(boxes_unact)  # [B, Q, d] each
        else:
            assert self.query_embed is not None and self.reference_points is not None
            batch = tokens.shape[0]
            query_pos, tgt = torch.split(self.query_embed.weight, self.hidden_dim, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)  # [B, Q, d]
            tgt = tgt[None].expand(batch, -1, -1)  # [B, Q, d]
            reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]

        box_heads = list(self.bbox_embed) if self.refine else None
        hidden, references = self.decoder(tgt, query_pos, reference, memory, spatial_shapes,
                                          level_start_index, valid_ratios, padding, box_heads,
                                          look_forward_twice=self.look_forward_twice)
        layers = []
        for i in range(hidden.shape[0]):
            class_head, box_head = self._heads(i)
            logits = class_head(hidden[i])  # [B, Q, C]
            boxes = refine_reference(box_head(hidden[i]), references[i], REFINE_EPS)  # [B, Q, 4]
            layers.append(LayerOutput(logits, boxes))
        return DetectorOutput(logits=layers[-1].logits, boxes=layers[-1].boxes, aux=layers[:-1],
                              enc=enc)
