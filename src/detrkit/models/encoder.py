"""Flattening the feature levels into tokens, and the encoder over them.

The ``L`` levels are flattened row-major one after the other into ``S = sum(h_l * w_l)``
tokens: ``[B, S, d]`` with a padding mask ``[B, S]`` (True = padding).

Padded images: deformable reference points are expressed relative to the *valid* (unpadded)
part of each level and scaled by that level's valid ratio, so a padded image samples the same
pixel positions as the same image without padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrkit.models.embeddings import MLP
from detrkit.models.layers import EncoderLayer, LayerSpec, Levels
from detrkit.ops.precision import float32_island

__all__ = ["valid_ratio", "flatten_levels", "encoder_reference_points", "Encoder"]


def valid_ratio(mask: Tensor) -> Tensor:
    """``mask`` ``[B, h, w]`` bool (True = padding, image in the top-left corner) -> ``[B, 2]``
    float32 ``(valid_w / w, valid_h / h)``."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)  # [B]
    valid_w = (~mask[:, 0, :]).sum(1)  # [B]
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def flatten_levels(
    srcs: Sequence[Tensor],
    masks: Sequence[Tensor],
    pos: Sequence[Tensor],
    level_embed: Tensor | None,
) -> tuple[Tensor, Levels]:
    """Flatten maps ``[B, d, h_l, w_l]``, masks ``[B, h_l, w_l]`` and position encodings
    ``[B, d, h_l, w_l]``; ``level_embed`` ``[L, d]`` (or ``None``) is added to level ``l``'s
    encoding. Returns the tokens ``[B, S, d]`` and their :class:`Levels`."""
    if not len(srcs) == len(masks) == len(pos):
        raise ValueError(f"got {len(srcs)} maps, {len(masks)} masks, {len(pos)} encodings")
    if level_embed is not None and level_embed.shape[0] != len(srcs):
        raise ValueError(f"expected {level_embed.shape[0]} feature levels, got {len(srcs)}")
    # plain ints in eager mode; symbolic sizes under torch.export (nothing is baked into a graph)
    shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
    tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, d]
    padding = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
    pos_parts = [p.flatten(2).transpose(1, 2) for p in pos]  # [B, h*w, d] each
    if level_embed is not None:
        pos_parts = [p + level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_parts)]
    levels = Levels(
        pos=torch.cat(pos_parts, 1),
        padding=padding,
        spatial_shapes=shapes,
        valid_ratios=torch.stack([valid_ratio(m) for m in masks], 1),
    )
    return tokens, levels


@float32_island
def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], valid_ratios: Tensor
) -> Tensor:
    """Reference point of every encoder token: the centre of its pixel, per level.

    Pixel ``(i, j)`` of level ``l`` is at ``((j + 0.5) / valid_w_l, (i + 0.5) / valid_h_l)``
    relative to the valid part of its level; times the valid ratio of level ``l'`` this is
    where it looks in level ``l'``.

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


class Encoder(nn.Module):
    """``num_layers`` :class:`EncoderLayer` over all tokens.

    Args:
        spec: the layers' settings (global or deformable attention, pre- or post-norm).
        num_layers: number of layers (0: the memory is the projected features).
        query_scale: multiply the position encoding, before every layer, by ``query_scale(x)``
            (an MLP of the layer input; DAB-DETR).

    State dict: ``layers.{i}.*``, ``query_scale.*``, ``norm`` (pre-norm only: a final
    LayerNorm, as DETR).
    """

    def __init__(self, spec: LayerSpec, num_layers: int, query_scale: bool = False) -> None:
        super().__init__()
        d = spec.d_model
        self.deformable = spec.attention == "deformable"
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(num_layers))
        self.query_scale = MLP(d, d, d, 2) if query_scale else None
        self.norm = nn.LayerNorm(d) if spec.pre_norm else None

    def forward(self, tokens: Tensor, levels: Levels) -> Tensor:
        """``tokens`` ``[B, S, d]`` -> memory ``[B, S, d]``."""
        reference = (
            encoder_reference_points(levels.spatial_shapes, levels.valid_ratios)
            if self.deformable and len(self.layers)
            else None
        )  # [B, S, L, 2]
        src = tokens
        for layer in self.layers:
            pos = levels.pos if self.query_scale is None else levels.pos * self.query_scale(src)
            src = layer(src, pos, levels, reference)
        if self.norm is not None:
            src = self.norm(src)
        return src
