"""Conditional-attention encoder and decoder with 4-D anchor queries (single-scale DAB-DETR).

Tensors are batch-first: tokens ``[B, S, d]``, memory padding mask ``[B, S]`` (True =
padding), queries ``[B, N, d]``, anchor boxes ``[B, N, 4]`` normalised cxcywh.

* Encoder: DETR post-norm layers whose positional encoding is rescaled per token and layer by
  ``query_scale(x)`` (an MLP of the layer input).
* Decoder layer: the query/key projections of self- and cross-attention are separate linear
  layers (``sa_qcontent_proj``, ``sa_qpos_proj``, ``ca_kpos_proj``, ...). Cross-attention
  concatenates, per head, the content part with a positional part: the query's projected sine
  embedding of its anchor centre (``ca_qpos_sine_proj``) against the keys' position encoding
  (``ca_kpos_proj``), so attention heads are ``2 d / nheads`` wide for queries/keys and
  ``d / nheads`` for values. Only the first layer also adds ``ca_qpos_proj(query_pos)`` to the
  query content.
* Decoder: each layer's positional query is ``ref_point_head`` of the sine embedding of its
  anchor box; the centre part is scaled by ``query_scale`` of the content (layers after the
  first) and, with ``modulate_hw_attn``, the x / y halves by (predicted width / anchor width) and
  (predicted height / anchor height) from ``ref_anchor_head``. After every layer the shared
  box head refines the anchor: ``sigmoid(bbox_embed(x) + inverse_sigmoid(anchor))``, detached
  before it feeds the next layer.

:class:`DABTransformer` is the transformer part of the single-scale DAB-DETR / DN-DETR
detector: encoder, anchor queries (with patterns), decoder, shared heads and DN-DETR's
training-time denoising queries. Sub-module names follow the official implementation, so
official keys map one to one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.boxes import inverse_sigmoid
from detrkit.models.denoising import (DenoisingQueries, DenoisingSettings, prepare_denoising,
                                      split_denoising)
from detrkit.models.encoder import Activation, GlobalEncoderLayer, build_activation
from detrkit.models.heads import MLP, init_class_head, zero_init_last_layer
from detrkit.models.interface import DetectionTransformer
from detrkit.structures import DenoisingOutput, DetectorOutput, LayerOutput, Target

__all__ = ["ANCHOR_EPS", "box_sine_embedding", "ProjectedAttention", "ConditionalEncoder",
           "ConditionalDecoderLayer", "ConditionalDecoder", "DABTransformer"]

ANCHOR_EPS = 1e-3  # inverse_sigmoid clamp of the DAB / DN / DINO code bases


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0,
                       scale: float = 2 * math.pi) -> Tensor:
    """Sine embedding of normalised boxes, coordinate order ``(y, x, w, h)``.

    Args:
        boxes: ``[..., 4]`` normalised cxcywh (or ``[..., 2]`` centres: only ``(y, x)``).
        num_feats: frequencies per coordinate (``d / 2``).
        temperature / scale: frequency base and range of the coordinates.

    Returns:
        ``[..., num_feats * boxes.shape[-1]]``; within each coordinate ``(sin f0, cos f1,
        sin f2, ...)`` with ``f_k = temperature ** (2 (k // 2) / num_feats)``. The frequencies
        are float32 (as in the official code); the result has the dtype of ``boxes``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(coord: Tensor) -> Tensor:  # [...] -> [..., F]
        pos = (coord * scale)[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(boxes[..., 1]), embed(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [embed(boxes[..., 2]), embed(boxes[..., 3])]
    elif boxes.shape[-1] != 2:
        raise ValueError(f"box_sine_embedding: expected 2 or 4 coordinates, got {boxes.shape[-1]}")
    return torch.cat(parts, dim=-1)


class ProjectedAttention(nn.Module):
    """Multi-head attention on already projected queries, keys and values, followed by
    ``out_proj`` (``Linear(value_dim, value_dim)``). Scores are scaled by
    ``(query_dim / nheads) ** -0.5``.

    Args:
        value_dim: width of the values and of the output. nheads: heads. dropout: on the
            attention weights.
    """

    def __init__(self, value_dim: int, nheads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nheads = nheads
        self.dropout = dropout
        self.out_proj = nn.Linear(value_dim, value_dim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """``q`` ``[B, N, H*Dq]``, ``k`` ``[B, S, H*Dq]``, ``v`` ``[B, S, H*Dv]``; ``attn_mask``
        ``[N, S]`` and ``key_padding_mask`` ``[B, S]`` bool (True = blocked) -> ``[B, N, H*Dv]``."""
        b, n, _ = q.shape
        s, h = k.shape[1], self.nheads
        q = q.reshape(b, n, h, -1).transpose(1, 2)  # [B, H, N, Dq]
        k = k.reshape(b, s, h, -1).transpose(1, 2)  # [B, H, S, Dq]
        v = v.reshape(b, s, h, -1).transpose(1, 2)  # [B, H, S, Dv]
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, S]
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)  # [B, N, H*Dv]
        return self.out_proj(out)


class ConditionalEncoder(nn.Module):
    """Post-norm global-attention encoder whose position encoding is multiplied, before every
    layer, by ``query_scale(x)`` (``MLP(d, d, d, 2)`` of the layer input).

    Args:
        layer: a post-norm :class:`~detrkit.models.encoder.GlobalEncoderLayer` (copied).
        num_layers: number of layers. d_model: width ``d``.
    """

    def __init__(self, layer: GlobalEncoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        if layer.pre_norm:
            raise ValueError("ConditionalEncoder: only post-norm layers are supported")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos``: ``[B, S, d]``; ``key_padding_mask``: ``[B, S]`` -> ``[B, S, d]``."""
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), key_padding_mask)
        return src


class ConditionalDecoderLayer(nn.Module):
    """Conditional self-/cross-attention + FFN, post-norm (see the module docstring).

    Args:
        d_model: width ``d``. nhead: heads. dim_feedforward: FFN width. dropout: dropout on
            attention weights, residual branches and inside the FFN. activation: FFN activation.
        query_pos_proj: whether this layer adds ``ca_qpos_proj(query_pos)`` to the
            cross-attention query (the official model: first layer only).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = "relu",
                 query_pos_proj: bool = True) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"model.transformer.hidden_dim ({d_model}) must be divisible by "
                             f"nheads ({nhead})")
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectedAttention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if query_pos_proj else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ProjectedAttention(d_model, nhead, dropout)
        self.nhead = nhead

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def _per_head_concat(self, a: Tensor, b: Tensor) -> Tensor:
        """``[B, N, d]`` twice -> ``[B, N, 2d]`` with head ``i`` = ``(a_i, b_i)``."""
        bsz, n, d = a.shape
        h = self.nhead
        return torch.cat([a.view(bsz, n, h, d // h), b.view(bsz, n, h, d // h)], dim=3
                         ).view(bsz, n, 2 * d)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                query_sine_embed: Tensor, self_attn_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None) -> Tensor:
        """One decoder layer.

        Args:
            tgt: ``[B, N, d]`` content queries. memory / pos: ``[B, S, d]`` encoder output and
                its position encoding. query_pos: ``[B, N, d]`` positional queries.
            query_sine_embed: ``[B, N, d]`` (scaled / modulated) sine embedding of the anchor
                centres. self_attn_mask: ``[N, N]`` bool (True = blocked).
            memory_key_padding_mask: ``[B, S]`` bool (True = padding).

        Returns:
            ``[B, N, d]``.
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attn = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))

        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q = self._per_head_concat(q_content, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._per_head_concat(k_content, k_pos)  # [B, S, 2d]
        attn = self.cross_attn(q, k, self.ca_v_proj(memory),
                               key_padding_mask=memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class ConditionalDecoder(nn.Module):
    """Anchor-box decoder: a stack of :class:`ConditionalDecoderLayer`, a final LayerNorm
    ``norm`` applied to every layer's output, ``query_scale`` (``MLP(d, d, d, 2)``),
    ``ref_point_head`` (``MLP(2d, d, d, 2)``) and, with ``modulate_hw_attn``,
    ``ref_anchor_head`` (``MLP(d, d, 2, 2)``). The shared box head is passed to
    :meth:`forward` (it belongs to the transformer part).

    Args:
        layer: the layer to copy (its ``ca_qpos_proj`` is kept in the first copy only).
        num_layers: ``L``. d_model: ``d``. modulate_hw_attn: see the module docstring.
    """

    def __init__(self, layer: ConditionalDecoderLayer, num_layers: int, d_model: int,
                 modulate_hw_attn: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        for later in list(self.layers)[1:]:
            later.ca_qpos_proj = None
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor,
                memory_key_padding_mask: Tensor | None, anchors_unact: Tensor,
                bbox_embed: nn.Module,
                self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run every layer and refine the anchors after each.

        Args:
            tgt: ``[B, N, d]`` initial content queries. memory / pos: ``[B, S, d]``.
            memory_key_padding_mask: ``[B, S]`` (True = padding).
            anchors_unact: ``[B, N, 4]`` initial anchors in inverse-sigmoid space.
            bbox_embed: the shared box head ``[..., d] -> [..., 4]`` (box deltas).
            self_attn_mask: ``[N, N]`` bool (True = blocked), e.g. for denoising groups.

        Returns:
            hidden: ``[L, B, N, d]`` every layer's output after ``norm``;
            anchors: ``[L, B, N, 4]`` the (sigmoid) anchor boxes each layer received. The
            refined anchors keep their gradient here; they are detached only as the next
            layer's input.
        """
        d = self.d_model
        output = tgt
        anchor = anchors_unact.sigmoid()  # [B, N, 4]
        anchors, hidden = [anchor], []
        for i, layer in enumerate(self.layers):
            sine = box_sine_embedding(anchor, d // 2)  # [B, N, 2d]
            query_pos = self.ref_point_head(sine)  # [B, N, d]
            sine = sine[..., :d]  # the centre part (y | x)
            if i > 0:
                sine = sine * self.query_scale(output)
            if self.ref_anchor_head is not None:
                ref_hw = self.ref_anchor_head(output).sigmoid()  # [B, N, 2] (w, h)
                sine = torch.cat([
                    sine[..., :d // 2] * (ref_hw[..., 1] / anchor[..., 3])[..., None],
                    sine[..., d // 2:] * (ref_hw[..., 0] / anchor[..., 2])[..., None]], dim=-1)
            output = layer(output, memory, pos, query_pos, sine, self_attn_mask,
                           memory_key_padding_mask)
            refined = (bbox_embed(output) + inverse_sigmoid(anchor, ANCHOR_EPS)).sigmoid()
            if i < len(self.layers) - 1:
                anchors.append(refined)
            anchor = refined.detach()
            hidden.append(self.norm(output))
        return torch.stack(hidden), torch.stack(anchors)


class DABTransformer(DetectionTransformer):
    """Single-scale DAB-DETR / DN-DETR after the neck.

    Queries: ``num_queries`` learned anchor boxes ``refpoint_embed`` ``[Q, 4]`` (inverse-sigmoid
    cxcywh). With ``num_patterns = K > 0`` every anchor is used ``K`` times with the learned
    content ``patterns`` ``[K, d]`` (``K * Q`` queries, pattern-major). The content of a query
    starts at zero (DAB-DETR) or, with denoising, at ``label_enc`` of the extra "unknown" class
    plus a 0 indicator channel (DN-DETR), plus its pattern.

    Denoising (training, ``denoising`` set and targets given, or ``dn_queries`` passed): noised
    targets are prepended as extra queries (:mod:`detrkit.models.denoising`, ``dn`` layout,
    content = ``label_enc(noised label)`` + indicator 1); their predictions are returned in
    ``DetectorOutput.dn`` and removed from the matching outputs.

    State dict (official names; official top-level heads live here): ``encoder.*``,
    ``decoder.*``, ``refpoint_embed``, ``patterns``, ``label_enc`` ``[C + 1, d - 1]``,
    ``class_embed`` ``Linear(d, C)``, ``bbox_embed`` (shared 3-layer MLP, official also
    ``transformer.decoder.bbox_embed``).

    Args:
        hidden_dim / nheads / enc_layers / dec_layers / dim_feedforward / dropout / activation:
            the transformer (``dec_layers >= 1``).
        num_queries: anchors ``Q``. num_classes: ``C`` (sigmoid logits).
        num_patterns: ``K`` (0 = none). modulate_hw_attn: width/height-modulated attention.
        random_refpoints_xy: anchor centres drawn uniformly and kept fixed (not trained; the
            official code means to freeze them but its ``requires_grad`` assignment is a no-op).
        denoising: :class:`~detrkit.models.denoising.DenoisingSettings` of DN-DETR (groups,
            label flip probability, box noise), or ``None`` (DAB-DETR).
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: Activation = "prelu",
        num_queries: int = 300,
        num_classes: int = 91,
        num_patterns: int = 0,
        modulate_hw_attn: bool = True,
        random_refpoints_xy: bool = False,
        denoising: DenoisingSettings | None = None,
    ) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError("model.transformer.dec_layers: must be >= 1")
        self.hidden_dim = hidden_dim
        self.num_levels = 1
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_patterns = num_patterns
        self.random_refpoints_xy = random_refpoints_xy
        self.denoising = denoising
        enc_layer = GlobalEncoderLayer(hidden_dim, nheads, dim_feedforward, dropout, activation)
        dec_layer = ConditionalDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout,
                                            activation)
        self.encoder = ConditionalEncoder(enc_layer, enc_layers, hidden_dim)
        self.decoder = ConditionalDecoder(dec_layer, dec_layers, hidden_dim, modulate_hw_attn)
        for module in (self.encoder, self.decoder):  # official: xavier on every matrix
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        if random_refpoints_xy:
            with torch.no_grad():
                xy = self.refpoint_embed.weight[:, :2]
                xy.copy_(inverse_sigmoid(torch.rand_like(xy), ANCHOR_EPS))
        self.patterns = nn.Embedding(num_patterns, hidden_dim) if num_patterns > 0 else None
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1) if denoising else None
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        init_class_head(self.class_embed)
        zero_init_last_layer(self.bbox_embed)

    def matching_queries(self, batch: int) -> tuple[Tensor, Tensor]:
        """Content ``[B, Q', d]`` and anchors (inverse-sigmoid) ``[B, Q', 4]`` of the
        ``Q' = Q * max(K, 1)`` matching queries."""
        anchors = self.refpoint_embed.weight  # [Q, 4]
        if self.random_refpoints_xy:
            anchors = torch.cat([anchors[:, :2].detach(), anchors[:, 2:]], dim=1)
        repeats = max(self.num_patterns, 1)
        anchors = anchors.repeat(repeats, 1)  # [Q', 4], pattern-major
        if self.label_enc is not None:
            unknown = self.label_enc.weight[self.num_classes]  # [d - 1]
            content = torch.cat([unknown, unknown.new_zeros(1)])[None].expand(len(anchors), -1)
        else:
            content = anchors.new_zeros(len(anchors), self.hidden_dim)
        if self.patterns is not None:
            content = content + self.patterns.weight.repeat_interleave(self.num_queries, 0)
        return (content[None].expand(batch, -1, -1), anchors[None].expand(batch, -1, -1))

    def make_denoising_queries(self, targets: Sequence[Target]) -> DenoisingQueries:
        """Draw the DN-DETR queries of ``targets`` (uses the global random generator)."""
        if self.denoising is None or self.label_enc is None:
            raise RuntimeError("DABTransformer: built without denoising")
        s = self.denoising
        return prepare_denoising(
            targets, self.label_enc, self.num_queries * max(self.num_patterns, 1), "dn",
            s.dn_number, s.label_noise_ratio, s.box_noise_scale, self.num_classes,
            indicator=True)

    def decode(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
               dn_queries: DenoisingQueries | None = None) -> tuple[Tensor, Tensor]:
        """Encoder and decoder without the heads.

        Args:
            srcs / masks / pos: one level ``[B, d, h, w]``, ``[B, h, w]`` (True = padding),
                ``[B, d, h, w]``.
            dn_queries: denoising queries to prepend (``P`` slots), or ``None``.

        Returns:
            hidden: ``[L, B, P + Q', d]`` every decoder layer's normed output; anchors:
            ``[L, B, P + Q', 4]`` the sigmoid anchor boxes each layer received (normalised
            cxcywh). ``Q' = Q * max(K, 1)``; the first ``P`` entries are the denoising slots.
        """
        if len(srcs) != 1:
            raise ValueError(f"DABTransformer takes one feature level, got {len(srcs)}")
        src, mask, pos_embed = srcs[0], masks[0], pos[0]
        batch = src.shape[0]
        tokens = src.flatten(2).transpose(1, 2)  # [B, S, d]
        pos_tokens = pos_embed.flatten(2).transpose(1, 2)  # [B, S, d]
        padding = mask.flatten(1)  # [B, S]
        memory = self.encoder(tokens, pos_tokens, padding)  # [B, S, d]

        content, anchors = self.matching_queries(batch)  # [B, Q', d], [B, Q', 4]
        attn_mask = None
        if dn_queries is not None and dn_queries.pad_size > 0:
            pad, attn_mask = dn_queries.pad_size, dn_queries.attn_mask
            size = pad + content.shape[1]
            if dn_queries.content.shape != (batch, pad, self.hidden_dim) or \
                    attn_mask is None or attn_mask.shape != (size, size):
                raise ValueError(
                    f"dn_queries: expected content {(batch, pad, self.hidden_dim)} and attn_mask "
                    f"{(size, size)}, got {tuple(dn_queries.content.shape)} and "
                    f"{None if attn_mask is None else tuple(attn_mask.shape)}")
            content = torch.cat([dn_queries.content.to(content), content], dim=1)
            anchors = torch.cat([dn_queries.boxes_unact.to(anchors), anchors], dim=1)
        return self.decoder(content, memory, pos_tokens, padding, anchors, self.bbox_embed,
                            attn_mask)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                targets: list[Target] | None = None,
                dn_queries: DenoisingQueries | None = None) -> DetectorOutput:
        """See :meth:`DetectionTransformer.forward`; one level ``[B, d, h, w]``, mask
        ``[B, h, w]`` (True = padding).

        Denoising queries are drawn from ``targets`` in training mode when the model has
        denoising; ``dn_queries`` (e.g. precomputed with
        :func:`~detrkit.models.denoising.prepare_denoising`, ``content [B, P, d]`` with the
        indicator channel) are used instead when given, in any mode. ``DetectorOutput.dn`` is
        set whenever denoising queries were used (with ``P = 0`` slots for a batch without
        targets).
        """
        if dn_queries is None and self.training and targets is not None \
                and self.denoising is not None:
            dn_queries = self.make_denoising_queries(targets)  # first random draws of the step
        hs, refs = self.decode(srcs, masks, pos, dn_queries)  # [L, B, P+Q', d], [L, B, P+Q', 4]
        logits = self.class_embed(hs)  # [L, B, P+Q', C]
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(refs, ANCHOR_EPS)).sigmoid()
        dn = None
        if dn_queries is not None:
            pad = dn_queries.pad_size
            dn_logits, logits = split_denoising(logits, pad)
            dn_boxes, boxes = split_denoising(boxes, pad)
            dn = DenoisingOutput([LayerOutput(a, b) for a, b in zip(dn_logits, dn_boxes)],
                                 dn_queries.meta)
        aux = [LayerOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)]
        return DetectorOutput(logits=logits[-1], boxes=boxes[-1], aux=aux, dn=dn)
