"""Deformable DETR decoder: query self-attention, deformable cross-attention, FFN, and the
optional iterative box refinement of the reference points.

Tensors are batch-first: queries ``[B, Q, d]``, memory ``[B, S, d]`` (the flattened levels),
memory padding mask ``[B, S]`` (True = padding). Reference points are normalised to the
*valid* part of the image: 2-D points ``(x, y)`` ``[B, Q, 2]`` or boxes ``(cx, cy, w, h)``
``[B, Q, 4]``; they are scaled by the valid ratios of every level before sampling.

Layer sub-module names and their order of use are the official ones: self-attention ->
``norm2``, cross-attention -> ``norm1``, FFN -> ``norm3``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrkit.boxes import inverse_sigmoid
from detrkit.models.encoder import Activation, build_activation, with_pos
from detrkit.ops.msda import Backend, MSDeformAttn

__all__ = ["DeformableDecoderLayer", "DeformableDecoder", "refine_reference"]

#: inverse_sigmoid clamp of Deformable DETR
REFINE_EPS = 1e-5


def refine_reference(delta: Tensor, reference: Tensor, eps: float = REFINE_EPS) -> Tensor:
    """Apply a box head's output to a reference in inverse-sigmoid space.

    Args:
        delta: ``[..., 4]`` head output (un-normalised offsets of ``(cx, cy, w, h)``).
        reference: ``[..., 4]`` normalised cxcywh boxes, or ``[..., 2]`` normalised points
            (then only the centre is offset; ``w, h`` come from ``delta`` alone).
        eps: clamp of :func:`~detrkit.boxes.inverse_sigmoid`.

    Returns:
        ``[..., 4]`` normalised cxcywh boxes ``sigmoid(delta + inverse_sigmoid(reference))``.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    if reference.shape[-1] != 2:
        raise ValueError(f"reference must end in 2 or 4 values, got {tuple(reference.shape)}")
    centre = delta[..., :2] + inverse_sigmoid(reference, eps)
    return torch.cat([centre, delta[..., 2:]], -1).sigmoid()


class DeformableDecoderLayer(nn.Module):
    """Self-attention over the queries (``query_pos`` added to q and k), multi-scale
    deformable cross-attention around the reference points, FFN; post-norm.

    Args:
        d_model: width ``d``. dim_feedforward: FFN width. dropout: in the self-attention and
            after every block. activation: FFN activation. n_levels: feature levels.
        n_heads: heads of both attentions. n_points: sampling points per head and level.
        msda_backend: operator backend of :class:`MSDeformAttn`.
    """

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: Activation = "relu", n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, msda_backend: Backend = "auto") -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor | None, reference_points: Tensor,
                memory: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor, memory_padding_mask: Tensor | None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """One decoder layer.

        Args:
            tgt, query_pos: ``[B, Q, d]``.
            reference_points: ``[B, Q, L, 2]`` points or ``[B, Q, L, 4]`` boxes, already scaled
                to each level's padded size.
            memory: ``[B, S, d]``. memory_padding_mask: ``[B, S]`` True = padding.
            self_attn_mask: ``[Q, Q]`` bool, True = not allowed to attend (denoising), or None.

        Returns:
            ``[B, Q, d]``.
        """
        q = k = with_pos(tgt, query_pos)
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(with_pos(tgt, query_pos), reference_points, memory, spatial_shapes,
                               level_start_index, memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer``; with ``box_heads`` every layer refines the reference.

    State dict: ``layers.{i}.*`` (official ``transformer.decoder.layers.{i}.*``). The box heads
    are owned by the caller (the transformer part) and passed to :meth:`forward`.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, tgt: Tensor, query_pos: Tensor | None, reference_points: Tensor,
                memory: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor, valid_ratios: Tensor,
                memory_padding_mask: Tensor | None,
                box_heads: Sequence[nn.Module] | None = None,
                self_attn_mask: Tensor | None = None,
                look_forward_twice: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Decode the queries.

        Args:
            tgt: ``[B, Q, d]`` content queries. query_pos: ``[B, Q, d]`` positional queries.
            reference_points: ``[B, Q, 2]`` normalised points or ``[B, Q, 4]`` normalised
                cxcywh boxes, relative to the valid image.
            memory: ``[B, S, d]`` encoder output. spatial_shapes: ``(h_l, w_l)`` per level.
            level_start_index: ``[L]`` int64. valid_ratios: ``[B, L, 2]`` ``(w, h)``.
            memory_padding_mask: ``[B, S]`` bool, True = padding.
            box_heads: one head per layer (``[B, Q, d] -> [B, Q, 4]``) for iterative box
                refinement: after layer ``i`` the reference becomes
                :func:`refine_reference` of ``box_heads[i]``'s output, detached (2-D points
                turn into 4-D boxes after the first layer). ``None``: references stay fixed.
            self_attn_mask: ``[Q, Q]`` bool, True = blocked, for the query self-attention.
            look_forward_twice: with ``box_heads``, return the refined references *before*
                detaching them (the next layer still receives them detached), so that a loss on
                layer ``i + 1``'s boxes reaches layer ``i``'s box prediction (DINO).

        Returns:
            hidden: ``[num_layers, B, Q, d]`` every layer's output.
            references: ``num_layers + 1`` tensors ``[B, Q, 2|4]``: ``references[i]`` is the
            reference layer ``i`` used (``references[0]`` is the input, not detached; later ones
            detached unless ``look_forward_twice``), the last one is the reference after the
            last layer.
        """
        if box_heads is not None and len(box_heads) < self.num_layers:
            raise ValueError(f"box refinement needs {self.num_layers} box heads, got "
                             f"{len(box_heads)}")
        output = tgt
        reference = reference_points
        hidden: list[Tensor] = []
        references = [reference]
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)  # [B, L, 4]
        for i, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                reference_input = reference[:, :, None] * ratios4[:, None]  # [B, Q, L, 4]
            else:
                reference_input = reference[:, :, None] * valid_ratios[:, None]  # [B, Q, L, 2]
            output = layer(output, query_pos, reference_input, memory, spatial_shapes,
                           level_start_index, memory_padding_mask, self_attn_mask)
            if box_heads is not None:
                refined = refine_reference(box_heads[i](output), reference)
                reference = refined.detach()
                hidden.append(output)
                references.append(refined if look_forward_twice else reference)
            else:
                hidden.append(output)
                references.append(reference)
        return torch.stack(hidden), references
