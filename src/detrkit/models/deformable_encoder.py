"""Deformable DETR encoder: multi-scale deformable self-attention over all feature levels.

Tensors are batch-first. The ``L`` feature levels are flattened row-major one after the other
into ``S = sum(h_l * w_l)`` tokens: ``src`` ``[B, S, d]``, padding mask ``[B, S]`` (True =
padding). Sub-module names follow the official implementation (``self_attn``, ``norm1``,
``linear1``, ``linear2``, ``norm2``), so official checkpoints need no renaming below the layer.

Padded images: every reference point is expressed relative to the *valid* (unpadded) part of
each level and scaled by that level's valid ratio, so a padded image gives the same
sampling positions (in pixels) as the same image without padding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.models.encoder import Activation, build_activation, with_pos
from detrkit.ops.msda import Backend, MSDeformAttn

__all__ = ["valid_ratio", "encoder_reference_points", "FlatLevels", "flatten_levels",
           "DeformableEncoderLayer", "DeformableEncoder"]


def valid_ratio(mask: Tensor) -> Tensor:
    """Fraction of every padded level that the image occupies.

    Args:
        mask: ``[B, h, w]`` bool, ``True`` = padding (the image is in the top-left corner).

    Returns:
        ``[B, 2]`` float32 ``(valid_w / w, valid_h / h)``: the number of valid pixels in the
        first row / column divided by the padded size.
    """
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)  # [B]
    valid_w = (~mask[:, 0, :]).sum(1)  # [B]
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


@dataclass
class FlatLevels:
    """The ``L`` feature levels flattened row-major into ``S = sum(h_l * w_l)`` tokens.

    tokens: ``[B, S, d]``. padding: ``[B, S]`` bool, True = padding. pos: ``[B, S, d]``
    position encoding plus the level embedding. spatial_shapes: ``(h_l, w_l)`` per level.
    level_start_index: ``[L]`` int64 offset of each level. valid_ratios: ``[B, L, 2]``
    ``(w, h)`` from :func:`valid_ratio`.
    """

    tokens: Tensor
    padding: Tensor
    pos: Tensor
    spatial_shapes: list[tuple[int, int]]
    level_start_index: Tensor
    valid_ratios: Tensor


def flatten_levels(srcs: Sequence[Tensor], masks: Sequence[Tensor], pos: Sequence[Tensor],
                   level_embed: Tensor) -> FlatLevels:
    """Flatten feature maps ``[B, d, h_l, w_l]``, masks ``[B, h_l, w_l]`` (True = padding) and
    position encodings ``[B, d, h_l, w_l]``; ``level_embed`` ``[L, d]`` is added to level
    ``l``'s encoding."""
    if not (len(srcs) == len(masks) == len(pos) == level_embed.shape[0]):
        raise ValueError(f"expected {level_embed.shape[0]} feature levels, got {len(srcs)} maps, "
                         f"{len(masks)} masks, {len(pos)} encodings")
    spatial_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
    tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, d]
    padding = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
    pos_tokens = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1)
                            for lvl, p in enumerate(pos)], 1)  # [B, S, d]
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + h * w)
    level_start_index = torch.tensor(starts, dtype=torch.int64, device=tokens.device)  # [L]
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [B, L, 2]
    return FlatLevels(tokens, padding, pos_tokens, spatial_shapes, level_start_index,
                      valid_ratios)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]],
                             valid_ratios: Tensor) -> Tensor:
    """Reference point of every encoder token: the centre of its pixel, per level.

    A pixel ``(i, j)`` of level ``l`` is at ``((j + 0.5) / valid_w_l, (i + 0.5) / valid_h_l)``
    relative to the valid part of its level; multiplied by the valid ratio of level ``l'``
    this is where the token looks in level ``l'`` (normalised by the padded size ``w_l'``).

    Args:
        spatial_shapes: ``(h_l, w_l)`` of each level.
        valid_ratios: ``[B, L, 2]`` ``(w, h)`` ratios from :func:`valid_ratio`.

    Returns:
        ``[B, S, L, 2]`` float32 ``(x, y)`` normalised to each level's padded size.
    """
    device = valid_ratios.device
    per_level = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5  # [h]
        xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5  # [w]
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w]
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, h*w]
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        per_level.append(torch.stack((ref_x, ref_y), -1))  # [B, h*w, 2]
    ref = torch.cat(per_level, 1)  # [B, S, 2]
    return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (position added to the queries) + FFN, post-norm.

    Args:
        d_model: width ``d``. dim_feedforward: FFN width. dropout: after attention, inside
            and after the FFN. activation: FFN activation.
        n_levels: feature levels ``L``. n_heads: attention heads. n_points: sampling points
            per head and level. msda_backend: operator backend of :class:`MSDeformAttn`.
    """

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: Activation = "relu", n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, msda_backend: Backend = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], level_start_index: Tensor,
                padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos``: ``[B, S, d]``; ``reference_points``: ``[B, S, L, 2]``;
        ``padding_mask``: ``[B, S]`` (True = padding) -> ``[B, S, d]``."""
        attn = self.self_attn(with_pos(src, pos), reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of ``layer`` sharing the token reference points (no final norm).

    State dict: ``layers.{i}.*`` (official ``transformer.encoder.layers.{i}.*``).
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor | None, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor, valid_ratios: Tensor,
                padding_mask: Tensor | None) -> Tensor:
        """Encode the flattened levels.

        Args:
            src: ``[B, S, d]`` flattened feature levels. pos: ``[B, S, d]`` position + level
                embeddings. spatial_shapes: ``(h_l, w_l)`` per level.
            level_start_index: ``[L]`` int64 offset of each level in ``S``.
            valid_ratios: ``[B, L, 2]`` from :func:`valid_ratio`.
            padding_mask: ``[B, S]`` bool, True = padding.

        Returns:
            memory ``[B, S, d]``.
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)  # [B,S,L,2]
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return src
