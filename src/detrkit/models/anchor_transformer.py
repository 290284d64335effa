"""The transformer part of DAB-Deformable-DETR, DN-Deformable-DETR and DINO: the Deformable
DETR encoder, 4-D anchor queries, the anchor decoder (:mod:`detrkit.models.anchor_decoder`),
optional training-time denoising queries and per-layer class / box heads.

Data flow (``B`` images, ``S`` encoder tokens, ``Q`` matching queries, ``P`` denoising slots)::

    srcs / masks / pos (L levels) -> flatten -> encoder: memory [B,S,d]
    queries  anchors: learned anchors refpoint_embed [Q,4] (inverse-sigmoid) + learned content
                      tgt_embed [Q,d] (optionally x num_patterns pattern embeddings)
             mixed:   every token proposes a box; the top-Q by their best class logit give the
                      anchors (detached), content = learned tgt_embed (or the selected
                      features, detached); enc = the selected proposals' logits and boxes
    denoising (training): P noised copies of the targets are prepended, with an attention mask
    decoder: hidden [L,B,P+Q,d], anchors[i] the box layer i refines
    heads:   logits class_i(hidden_i) [B,P+Q,C], boxes sigmoid(box_i(hidden_i) +
             inverse_sigmoid(anchors[i])) -> split into dn [B,P,.] and matching [B,Q,.]

State dict below ``transformer.``: ``level_embed`` ``[L, d]``, ``encoder.layers.{i}.*``,
``decoder.{layers.{i},ref_point_head,query_scale,norm}.*``, ``tgt_embed`` ``[Q, d_c]``
(``d_c = d - 1`` with the denoising indicator), ``refpoint_embed`` ``[Q, 4]`` (anchors),
``patterns_embed`` ``[K, d_c]``, ``query_selection.enc_output(_norm)`` (mixed),
``class_embed.{i}`` / ``bbox_embed.{i}`` (one entry when shared), ``enc_class_embed`` /
``enc_bbox_embed`` (mixed, unless shared with the decoder heads), ``label_enc``
``[labelbook + 1, d_c]`` (denoising).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from detrkit.boxes import inverse_sigmoid
from detrkit.models.anchor_decoder import ANCHOR_EPS, AnchorDeformableDecoder
from detrkit.models.deformable_decoder import DeformableDecoderLayer, refine_reference
from detrkit.models.deformable_encoder import (DeformableEncoder, DeformableEncoderLayer,
                                               flatten_levels)
from detrkit.models.denoising import (DenoisingKind, DenoisingQueries, DenoisingSettings,
                                      prepare_denoising, split_denoising)
from detrkit.models.encoder import Activation
from detrkit.models.heads import MLP, init_class_head, zero_init_last_layer
from detrkit.models.interface import DetectionTransformer
from detrkit.models.queries import QuerySelection, gather_tokens
from detrkit.ops.msda import Backend, MSDeformAttn
from detrkit.structures import DenoisingOutput, DetectorOutput, LayerOutput, Target

__all__ = ["AnchorDeformableTransformer"]

AnchorQueryKind = Literal["anchors", "mixed"]
BoxUpdate = Literal["none", "refine", "look_forward_twice"]


class AnchorDeformableTransformer(DetectionTransformer):
    """Deformable transformer part with 4-D anchor queries.

    Args:
        hidden_dim / nheads / enc_layers / dec_layers / dim_feedforward / dropout / activation /
            num_feature_levels / enc_n_points / dec_n_points / msda_backend: as
            :class:`~detrkit.models.deformable_transformer.DeformableTransformer`.
        num_queries: matching queries ``Q`` (anchors, or proposals kept).
        num_classes: class logits ``C`` (sigmoid).
        query_kind: ``anchors`` (DAB / DN-Deformable) or ``mixed`` (DINO).
        box_update: ``none`` (anchors fixed), ``refine`` (each layer refines the detached
            anchor; DAB / DN) or ``look_forward_twice`` (DINO).
        query_scale: conditional scaling of the positional query (DAB / DN-Deformable).
        decoder_norm: LayerNorm on the decoder outputs before the heads (DINO).
        share_class_head / share_box_head: one head for all decoder layers (DINO) instead of
            one per layer; ``None`` = shared exactly when ``box_update`` is ``none``.
        share_encoder_class_head / share_encoder_box_head: mixed: the encoder proposals use
            the (shared) decoder head instead of their own.
        select_valid_proposals: mixed: never select padding / invalid tokens while enough
            valid ones exist (``False``: the official ranking).
        learned_content: mixed: learned content queries (DINO) or the selected encoder
            features, detached.
        num_patterns: anchors: ``K > 0`` pattern embeddings; every anchor is decoded ``K``
            times (``K * Q`` queries, pattern-major).
        random_refpoints_xy: anchors: initialise anchor centres uniformly.
        denoising: ``dn`` (DN-DETR groups), ``cdn`` (DINO contrastive groups) or ``None``.
        denoising_settings: ``dn_number``, label / box noise of the denoising queries.
        content_indicator: denoising content = label embedding (``d - 1`` wide) plus a 0/1
            indicator channel (DN-Deformable); matching content = ``tgt_embed`` plus 0.
        labelbook_size: rows of the label embedding minus one (``None`` = ``num_classes``).
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: Activation = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        num_queries: int = 900,
        num_classes: int = 91,
        query_kind: AnchorQueryKind = "mixed",
        box_update: BoxUpdate = "look_forward_twice",
        query_scale: bool = False,
        decoder_norm: bool = True,
        share_class_head: bool | None = None,
        share_box_head: bool | None = None,
        share_encoder_class_head: bool = False,
        share_encoder_box_head: bool = False,
        select_valid_proposals: bool = True,
        learned_content: bool = True,
        num_patterns: int = 0,
        random_refpoints_xy: bool = False,
        denoising: DenoisingKind | None = None,
        denoising_settings: DenoisingSettings | None = None,
        content_indicator: bool = False,
        labelbook_size: int | None = None,
        msda_backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if query_kind not in ("anchors", "mixed"):
            raise ValueError(f"model.queries.kind: anchor decoders take 'anchors' or 'mixed', "
                             f"got '{query_kind}'")
        if box_update not in ("none", "refine", "look_forward_twice"):
            raise ValueError(f"model.queries.box_update: unknown '{box_update}'")
        if dec_layers < 1:
            raise ValueError(f"model.transformer.dec_layers: must be >= 1, got {dec_layers}")
        if num_patterns and query_kind != "anchors":
            raise ValueError("model.queries.num_patterns: patterns need queries.kind=anchors")
        if content_indicator and denoising and query_kind == "mixed" and not learned_content:
            raise ValueError("model.denoising.content_indicator: needs learned content queries "
                             "(model.queries.learned_content=true)")
        self.hidden_dim = hidden_dim
        self.num_levels = num_feature_levels
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.mixed = query_kind == "mixed"
        self.box_update = box_update
        self.learned_content = learned_content
        self.num_patterns = num_patterns
        self.random_refpoints_xy = random_refpoints_xy
        self.denoising = denoising
        self.denoising_settings = denoising_settings or DenoisingSettings()
        self.indicator = bool(denoising) and content_indicator
        content_dim = hidden_dim - 1 if self.indicator else hidden_dim

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        enc_layer = DeformableEncoderLayer(hidden_dim, dim_feedforward, dropout, activation,
                                           num_feature_levels, nheads, enc_n_points, msda_backend)
        dec_layer = DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, activation,
                                           num_feature_levels, nheads, dec_n_points, msda_backend)
        self.encoder = DeformableEncoder(enc_layer, enc_layers)
        self.decoder = AnchorDeformableDecoder(dec_layer, dec_layers, hidden_dim,
                                               query_scale=query_scale, final_norm=decoder_norm)
        self.query_selection = QuerySelection(hidden_dim, num_queries,
                                              select_valid_only=select_valid_proposals) \
            if self.mixed else None
        self._init_body()

        self.tgt_embed = nn.Embedding(num_queries, content_dim) \
            if learned_content or not self.mixed else None
        if self.tgt_embed is not None and self.mixed:
            nn.init.xavier_uniform_(self.tgt_embed.weight)  # official DINO initialisation
        self.refpoint_embed: nn.Embedding | None = None
        if not self.mixed:
            self.refpoint_embed = nn.Embedding(num_queries, 4)
            if random_refpoints_xy:
                with torch.no_grad():
                    xy = self.refpoint_embed.weight[:, :2]
                    xy.copy_(inverse_sigmoid(torch.rand_like(xy), ANCHOR_EPS))
        self.patterns_embed = nn.Embedding(num_patterns, content_dim) if num_patterns else None
        self.label_enc: nn.Embedding | None = None
        if denoising is not None:
            book = num_classes if labelbook_size is None else labelbook_size
            if book < num_classes:
                raise ValueError(f"model.denoising.labelbook_size: {book} < num_classes "
                                 f"{num_classes}")
            self.label_enc = nn.Embedding(book + 1, content_dim)
        self._build_heads(dec_layers, num_classes, share_class_head, share_box_head,
                          share_encoder_class_head, share_encoder_box_head)

    # ------------------------------------------------------------------ construction

    def _init_body(self) -> None:
        """Official initialisation: xavier on every matrix of encoder, decoder and proposal
        branch, the deformable attention's own scheme, a normal level embedding."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def _build_heads(self, dec_layers: int, num_classes: int, share_class: bool | None,
                     share_box: bool | None, share_enc_class: bool, share_enc_box: bool) -> None:
        default_share = self.box_update == "none"
        share_class = default_share if share_class is None else share_class
        share_box = default_share if share_box is None else share_box
        if (share_enc_class and not share_class) or (share_enc_box and not share_box):
            raise ValueError("model.heads.share_encoder_*: the encoder proposals can only share "
                             "a decoder head that is itself shared by all layers")
        class_head = nn.Linear(self.hidden_dim, num_classes)
        box_head = MLP(self.hidden_dim, self.hidden_dim, 4, 3)
        init_class_head(class_head)
        zero_init_last_layer(box_head)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head)
                                         for _ in range(1 if share_class else dec_layers))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head)
                                        for _ in range(1 if share_box else dec_layers))
        if not self.mixed and self.box_update != "none":
            # DAB-Deformable: the first layer's boxes start small, sigmoid(-2) ~ 0.12
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        self.enc_class_embed: nn.Linear | None = None
        self.enc_bbox_embed: MLP | None = None
        if self.mixed:
            self.enc_class_embed = None if share_enc_class else copy.deepcopy(class_head)
            self.enc_bbox_embed = None if share_enc_box else copy.deepcopy(box_head)

    def _heads(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """Class and box head of decoder layer ``layer``."""
        return (self.class_embed[min(layer, len(self.class_embed) - 1)],
                self.bbox_embed[min(layer, len(self.bbox_embed) - 1)])

    # ------------------------------------------------------------------ queries

    def make_denoising_queries(self, targets: list[Target]) -> DenoisingQueries:
        """Draw the denoising queries of ``targets`` (global random generator): ``content``
        ``[B, P, d]`` (indicator channel included), ``boxes_unact`` ``[B, P, 4]``, the
        ``[P + Q', P + Q']`` attention mask for the ``Q'`` matching queries, and the meta."""
        if self.denoising is None or self.label_enc is None:
            raise RuntimeError("AnchorDeformableTransformer: built without denoising")
        s = self.denoising_settings
        return prepare_denoising(targets, self.label_enc, self.num_matching_queries,
                                 self.denoising, s.dn_number, s.label_noise_ratio,
                                 s.box_noise_scale, self.num_classes, indicator=self.indicator)

    @property
    def num_matching_queries(self) -> int:
        """Decoder queries besides the denoising ones: ``Q * max(K, 1)``."""
        return self.num_queries * max(self.num_patterns, 1)

    def _learned_queries(self, batch: int) -> tuple[Tensor, Tensor]:
        """anchors: content ``[B, Q', d_c]`` and anchors (inverse-sigmoid) ``[B, Q', 4]``."""
        assert self.refpoint_embed is not None and self.tgt_embed is not None
        content, anchors = self.tgt_embed.weight, self.refpoint_embed.weight  # [Q, d_c], [Q, 4]
        if self.random_refpoints_xy:  # the random centres stay fixed
            anchors = torch.cat([anchors[:, :2].detach(), anchors[:, 2:]], dim=1)
        if self.patterns_embed is not None:
            k = self.num_patterns
            content = content.repeat(k, 1) + \
                self.patterns_embed.weight.repeat_interleave(self.num_queries, 0)  # [K*Q, d_c]
            anchors = anchors.repeat(k, 1)  # [K*Q, 4], pattern-major
        return content[None].expand(batch, -1, -1), anchors[None].expand(batch, -1, -1)

    def _selected_queries(self, memory: Tensor, padding: Tensor,
                          spatial_shapes: list[tuple[int, int]]
                          ) -> tuple[Tensor, Tensor, LayerOutput]:
        """mixed: content ``[B, Q, d]``, detached anchors ``[B, Q, 4]`` (inverse-sigmoid) and
        the selected proposals (logits ``[B, Q, C]``, sigmoid boxes ``[B, Q, 4]``)."""
        assert self.query_selection is not None
        features, proposals, invalid = self.query_selection.proposals(
            memory, padding, spatial_shapes)  # [B, S, d], [B, S, 4], [B, S]
        enc_class = self.enc_class_embed if self.enc_class_embed is not None \
            else self.class_embed[0]
        enc_box = self.enc_bbox_embed if self.enc_bbox_embed is not None else self.bbox_embed[0]
        logits = enc_class(features)  # [B, S, C]
        boxes_unact = enc_box(features) + proposals  # [B, S, 4]
        index = self.query_selection.select(logits, invalid)  # [B, Q]
        chosen_boxes = gather_tokens(boxes_unact, index)  # [B, Q, 4]
        enc = LayerOutput(gather_tokens(logits, index), chosen_boxes.sigmoid())
        if self.tgt_embed is not None:
            content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        else:
            content = gather_tokens(features, index).detach()
        return content, chosen_boxes.detach(), enc

    # ------------------------------------------------------------------ forward

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                targets: list[Target] | None = None,
                dn_queries: DenoisingQueries | None = None) -> DetectorOutput:
        """See :meth:`DetectionTransformer.forward`: ``L`` maps ``[B, d, h_l, w_l]``, masks
        ``[B, h_l, w_l]`` (True = padding), encodings ``[B, d, h_l, w_l]``.

        Denoising queries are drawn from ``targets`` in training mode when the model has
        denoising. ``dn_queries`` (e.g. from
        :func:`~detrkit.models.denoising.prepare_denoising`; ``content`` ``[B, P, d]``
        including the indicator channel, ``boxes_unact`` ``[B, P, 4]``, mask
        ``[P + Q', P + Q']``) are used instead when given, in any mode.

        Returns:
            :class:`DetectorOutput`: ``logits`` ``[B, Q', C]``, ``boxes`` ``[B, Q', 4]``
            (normalised cxcywh) of the last layer, ``aux`` the earlier layers, ``enc`` (mixed)
            the ``Q`` selected proposals (logits, sigmoid boxes), ``dn`` the denoising slots
            ``[B, P, .]`` per layer with their meta.
        """
        if dn_queries is None and self.training and targets is not None \
                and self.denoising is not None:
            dn_queries = self.make_denoising_queries(targets)  # first random draws of the step
        flat = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(flat.tokens, flat.pos, flat.spatial_shapes, flat.level_start_index,
                              flat.valid_ratios, flat.padding)  # [B, S, d]
        batch = memory.shape[0]

        enc: LayerOutput | None = None
        if self.mixed:
            content, anchors, enc = self._selected_queries(memory, flat.padding,
                                                           flat.spatial_shapes)
        else:
            content, anchors = self._learned_queries(batch)
        if self.indicator:  # matching queries: indicator 0
            content = torch.cat([content, content.new_zeros(*content.shape[:2], 1)], dim=-1)

        pad, attn_mask = 0, None
        if dn_queries is not None and dn_queries.pad_size > 0:
            pad, attn_mask = dn_queries.pad_size, dn_queries.attn_mask
            expected = (batch, pad, self.hidden_dim)
            if tuple(dn_queries.content.shape) != expected:
                raise ValueError(f"dn_queries.content: expected {expected}, got "
                                 f"{tuple(dn_queries.content.shape)}")
            content = torch.cat([dn_queries.content.to(content), content], dim=1)
            anchors = torch.cat([dn_queries.boxes_unact.to(anchors), anchors], dim=1)
        if attn_mask is not None:
            if tuple(attn_mask.shape) != (content.shape[1], content.shape[1]):
                raise ValueError(f"dn_queries.attn_mask: expected {content.shape[1]} x "
                                 f"{content.shape[1]} (denoising + matching queries), got "
                                 f"{tuple(attn_mask.shape)}")
            attn_mask = attn_mask.to(content.device)

        box_heads = None if self.box_update == "none" else \
            [self._heads(i)[1] for i in range(self.decoder.num_layers)]
        hidden, refs = self.decoder(content, anchors.sigmoid(), memory, flat.spatial_shapes,
                                    flat.level_start_index, flat.valid_ratios, flat.padding,
                                    box_heads, attn_mask,
                                    look_forward_twice=self.box_update == "look_forward_twice")
        if self.label_enc is not None:  # keeps the label embedding in every graph (no targets)
            hidden = hidden + 0.0 * self.label_enc.weight[0, 0]
        layers = []
        for i in range(hidden.shape[0]):
            class_head, box_head = self._heads(i)
            boxes = refine_reference(box_head(hidden[i]), refs[i], ANCHOR_EPS)  # [B, P+Q', 4]
            layers.append(LayerOutput(class_head(hidden[i]), boxes))
        dn = None
        if dn_queries is not None:
            dn_layers, matched = [], []
            for layer in layers:
                dn_logits, logits = split_denoising(layer.logits, pad)
                dn_boxes, boxes = split_denoising(layer.boxes, pad)
                dn_layers.append(LayerOutput(dn_logits, dn_boxes))
                matched.append(LayerOutput(logits, boxes))
            layers = matched
            dn = DenoisingOutput(dn_layers, dn_queries.meta)
        return DetectorOutput(logits=layers[-1].logits, boxes=layers[-1].boxes, aux=layers[:-1],
                              enc=enc, dn=dn)
