"""Pure PyTorch multi-scale deformable attention (the ``"reference"`` backend).

The computation is the one of ``ms_deform_attn_core_pytorch`` from Deformable-DETR, with the
same order of operations so that float32 results are bit-identical to it: per level a
``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) of the value map reshaped to
``[B * heads, C, H, W]`` with grids ``[B * heads, Q, P, 2]``, a stack over levels, a flatten of
``(levels, points)``, a product with the attention weights and a sum over the last dimension.

It runs on any device, is differentiable (also twice) and exports to ONNX (opset >= 16,
``GridSample``) provided the spatial shapes are known as Python integers at export time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SpatialShapes",
    "as_shape_list",
    "compute_dtype",
    "level_start_index_of",
    "ms_deform_attn_reference",
    "prepare_inputs",
]

#: ``[L, 2]`` int64 tensor of ``(H, W)`` rows, or a sequence of ``(H, W)`` Python ints.
SpatialShapes = Tensor | Sequence[Sequence[int]]


def as_shape_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``(H, W)`` of every level as Python ints.

    spatial_shapes: ``[L, 2]`` integer tensor or a sequence of ``(H, W)`` pairs. A tensor on the
    GPU costs one device synchronisation; under ``torch.jit`` tracing (ONNX export) the values
    become constants of the exported graph.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be [L, 2], got {tuple(spatial_shapes.shape)}")
        rows = spatial_shapes.tolist()
    else:
        rows = [tuple(row) for row in spatial_shapes]
    shapes = []
    for row in rows:
        if len(row) != 2:
            raise ValueError(f"every spatial shape must be (H, W), got {row!r}")
        # symbolic sizes (torch.export) stay symbolic: an int() would bake them into the graph
        shapes.append(tuple(v if isinstance(v, torch.SymInt) else int(v) for v in row))
    return shapes


def level_start_index_of(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """Offset of every level in the flattened sequence: ``[0, H0*W0, H0*W0 + H1*W1, ...]``."""
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return starts


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (half-precision values are upcast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def prepare_inputs(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, weights: Tensor
) -> tuple[list[tuple[int, int]], Tensor, Tensor, Tensor]:
    """The shape list (one ``(H, W)`` per level, checked against the locations) and the three
    tensors in the :func:`compute_dtype` of the op."""
    shapes = as_shape_list(spatial_shapes)
    levels = sampling_locations.shape[3]
    if len(shapes) != levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {levels} levels of sampling locations")
    dtype = compute_dtype(value, sampling_locations, weights)
    return shapes, value.to(dtype), sampling_locations.to(dtype), weights.to(dtype)


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``.

    Args:
        value: ``[B, S, heads, C]``, the flattened levels one after the other
            (``S = sum(H_l * W_l)``). Any floating dtype.
        spatial_shapes: ``(H, W)`` of each level, ``[L, 2]`` int64 tensor or Python ints.
        sampling_locations: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` normalised to ``[0, 1]`` per
            level; ``loc`` maps to the pixel coordinate ``loc * size - 0.5`` (pixel centres,
            ``align_corners=False``). Locations outside the map are allowed.
        attention_weights: ``[B, Q, heads, L, P]``.

    Returns:
        ``[B, Q, heads * C]`` in the dtype of ``value``. Bilinear interpolation, neighbours
        outside the map contribute zero. The arithmetic runs in float32 (float64 if any input
        is float64): half-precision values are upcast, locations are never rounded to half.
    """
    out_dtype = value.dtype
    shapes, value, sampling_locations, attention_weights = prepare_inputs(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape

    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [B, H*W, heads, C] -> [B, H*W, heads*C] -> [B, heads*C, H*W] -> [B*heads, C, H, W]
        value_l = (
            value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
        )
        # [B, Q, heads, P, 2] -> [B, heads, Q, P, 2] -> [B*heads, Q, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [B*heads, C, Q, P]
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [B, Q, heads, L, P] -> [B, heads, Q, L, P] -> [B*heads, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    # [B*heads, C, Q, L, P] -> [B*heads, C, Q, L*P] -> [B*heads, C, Q] -> [B, heads*C, Q]
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(batch, heads * channels, queries)
    return output.transpose(1, 2).contiguous().to(out_dtype)
