"""Deformable decoder with dynamic anchor boxes (DAB-Deformable-DETR, DN-Deformable-DETR, DINO).

Every query carries a 4-D anchor box ``(cx, cy, w, h)`` (normalised to the valid image). Before
each layer the anchor is turned into the layer's positional query: a sine embedding of the box
(:func:`anchor_sine_embedding`) goes through the MLP ``ref_point_head``; DAB-style decoders
multiply it, from the second layer on, by ``query_scale(content)``. The layer itself is the
Deformable DETR decoder layer (self-attention -> deformable cross-attention around the anchor
-> FFN). After a layer the anchor is refined by that layer's box head and detached.

As in the official code, the sine embedding is taken of the anchor scaled by the *first*
level's valid ratio (i.e. normalised by the padded size), so an image's positional queries,
unlike its encoder features, depend on how much padding the batch adds.

Tensors are batch-first: queries ``[B, N, d]``, memory ``[B, S, d]``, memory padding mask
``[B, S]`` (True = padding). State dict (official names below ``transformer.decoder.``):
``layers.{i}.*``, ``ref_point_head.layers.{0,1}``, ``query_scale.layers.{0,1}`` (DAB) and
``norm`` (DINO).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrkit.models.deformable_decoder import DeformableDecoderLayer, refine_reference
from detrkit.models.heads import MLP

__all__ = ["ANCHOR_EPS", "anchor_sine_embedding", "AnchorDeformableDecoder"]

#: inverse_sigmoid clamp of DAB-DETR, DN-DETR and DINO
ANCHOR_EPS = 1e-3


def anchor_sine_embedding(boxes: Tensor, num_pos_feats: int = 128,
                          temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised boxes (or points), in the DAB-DETR layout.

    Each coordinate is multiplied by ``2 * pi`` and divided by ``num_pos_feats`` frequencies
    ``temperature ** (2 * (k // 2) / num_pos_feats)`` (computed in float32); ``sin`` / ``cos``
    alternate within a coordinate.

    Args:
        boxes: ``[..., 4]`` normalised ``(cx, cy, w, h)`` or ``[..., 2]`` ``(x, y)``.
        num_pos_feats: channels per coordinate (``d / 2``; the official models: 128).
        temperature: frequency base.

    Returns:
        ``[..., 4 * num_pos_feats]`` in the order ``(y, x, w, h)`` (``[..., 2 * F]``,
        ``(y, x)`` for points).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    coords = boxes * (2 * math.pi)  # [..., 4]
    pos = coords[..., None] / dim_t.to(boxes.dtype)  # [..., 4, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    if boxes.shape[-1] == 2:
        order = [1, 0]
    elif boxes.shape[-1] == 4:
        order = [1, 0, 2, 3]
    else:
        raise ValueError(f"anchor_sine_embedding: expected [..., 2] or [..., 4] boxes, got "
                         f"{tuple(boxes.shape)}")
    return torch.cat([pos[..., i, :] for i in order], dim=-1)


class AnchorDeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer`` with anchor-conditioned positional queries.

    Args:
        layer: the decoder layer to clone.
        num_layers: number of layers ``L``.
        d_model: width ``d`` (even: ``d / 2`` sine frequencies per anchor coordinate).
        query_scale: DAB-Deformable / DN-Deformable: scale the positional query of layers
            ``>= 1`` by ``query_scale(content)`` (an MLP ``d -> d -> d``).
        final_norm: DINO: a shared ``LayerNorm`` applied to every layer's output before it is
            returned (the anchor update inside the decoder uses the un-normalised output).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int,
                 query_scale: bool = True, final_norm: bool = False) -> None:
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"model.transformer.hidden_dim: anchor queries need an even width, "
                             f"got {d_model}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if query_scale else None
        self.norm = nn.LayerNorm(d_model) if final_norm else None

    def forward(self, tgt: Tensor, anchors: Tensor, memory: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], level_start_index: Tensor,
                valid_ratios: Tensor, memory_padding_mask: Tensor | None,
                box_heads: Sequence[nn.Module] | None = None,
                self_attn_mask: Tensor | None = None,
                look_forward_twice: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Decode the queries.

        Args:
            tgt: ``[B, N, d]`` content queries.
            anchors: ``[B, N, 4]`` normalised cxcywh anchor boxes (relative to the valid image).
            memory: ``[B, S, d]`` encoder output. spatial_shapes: ``(h_l, w_l)`` per level.
            level_start_index: ``[L]`` int64. valid_ratios: ``[B, L, 2]`` ``(w, h)``.
            memory_padding_mask: ``[B, S]`` bool, True = padding.
            box_heads: one box head per layer (``[B, N, d] -> [B, N, 4]``; the same module may
                repeat): after layer ``i`` the anchor becomes
                ``sigmoid(box_heads[i](output) + inverse_sigmoid(anchor))`` (clamp 1e-3),
                detached for the next layer. ``None``: anchors stay fixed.
            self_attn_mask: ``[N, N]`` bool, True = blocked (denoising groups).
            look_forward_twice: return the refined anchors before they are detached (DINO),
                so that layer ``i + 1``'s boxes back-propagate into layer ``i``'s box head.

        Returns:
            hidden: ``[L, B, N, d]`` every layer's output (normalised with ``final_norm``).
            anchors: ``L + 1`` tensors ``[B, N, 4]``: ``anchors[i]`` is the anchor layer ``i``
            refines (``anchors[0]`` is the input; later ones detached unless
            ``look_forward_twice``); the last is the anchor after the last layer.
        """
        if box_heads is not None and len(box_heads) < self.num_layers:
            raise ValueError(f"anchor refinement needs {self.num_layers} box heads, got "
                             f"{len(box_heads)}")
        if anchors.shape[-1] != 4:
            raise ValueError(f"anchors must be [B, N, 4] boxes, got {tuple(anchors.shape)}")
        output = tgt
        anchor = anchors
        hidden: list[Tensor] = []
        returned = [anchors]
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)  # [B, L, 4]
        for i, layer in enumerate(self.layers):
            anchor_input = anchor[:, :, None] * ratios4[:, None]  # [B, N, L, 4]
            sine = anchor_sine_embedding(anchor_input[:, :, 0], self.d_model // 2)  # [B, N, 2d]
            query_pos = self.ref_point_head(sine)  # [B, N, d]
            if self.query_scale is not None and i > 0:
                query_pos = self.query_scale(output) * query_pos
            output = layer(output, query_pos, anchor_input, memory, spatial_shapes,
                           level_start_index, memory_padding_mask, self_attn_mask)
            if box_heads is not None:
                refined = refine_reference(box_heads[i](output), anchor, ANCHOR_EPS)
                anchor = refined.detach()
                returned.append(refined if look_forward_twice else anchor)
            else:
                returned.append(anchor)
            hidden.append(self.norm(output) if self.norm is not None else output)
        return torch.stack(hidden), returned
