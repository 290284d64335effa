"""Multi-scale deformable attention with explicit bilinear gathers (the ``"gather"`` backend).

The same operator as :func:`~detrkit.ops.msda.reference.ms_deform_attn_reference`, written with
``floor``, ``clamp`` and ``gather`` instead of ``grid_sample``: it exports to ONNX at any opset
(no ``GridSample``, which opsets below 16 lack and which some runtimes compile badly, e.g.
TensorRT) and runs, and differentiates, in PyTorch on any device.

A location ``loc`` is the pixel coordinate ``loc * size - 0.5`` (``align_corners=False``); its
four neighbours are weighted bilinearly and neighbours outside the map contribute zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.ops.msda.reference import SpatialShapes, prepare_inputs

__all__ = ["ms_deform_attn_gather"]


def _sample_level(value_l: Tensor, loc: Tensor, h, w) -> Tensor:
    """Bilinear samples of ``value_l`` ``[N, h*w, C]`` at ``loc`` ``[N, K, 2]`` (normalised
    ``(x, y)``) -> ``[N, K, C]``."""
    x = loc[..., 0] * w - 0.5
    y = loc[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    out = None
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):  # fmt: skip
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [N, K]
        corner = torch.gather(value_l, 1, index[..., None].expand(-1, -1, value_l.shape[-1]))
        term = corner * (weight * inside.to(weight.dtype))[..., None]
        out = term if out is None else out + term
    return out


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with bilinear gathers.

    Args:
        value: ``[B, S, heads, C]``, the flattened levels one after the other.
        spatial_shapes: ``(H, W)`` of each level (``[L, 2]`` tensor, ints or symbolic sizes).
        sampling_locations: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` normalised per level.
        attention_weights: ``[B, Q, heads, L, P]``.

    Returns:
        ``[B, Q, heads * C]`` in the dtype of ``value`` (computed in float32, or float64).
    """
    out_dtype = value.dtype
    shapes, value, locs, weights = prepare_inputs(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = locs.shape
    value = value.transpose(1, 2).flatten(0, 1)  # [B*heads, S, C]
    locs = locs.permute(0, 2, 3, 1, 4, 5).flatten(0, 1).flatten(2, 3)  # [B*heads, L, Q*P, 2]
    weights = weights.permute(0, 2, 3, 1, 4).flatten(0, 1)  # [B*heads, L, Q, P]
    output, start = None, 0
    for level, (h, w) in enumerate(shapes):
        value_l = value[:, start : start + h * w]  # [B*heads, h*w, C]
        sampled = _sample_level(value_l, locs[:, level], h, w).view(-1, queries, points, channels)
        term = (sampled * weights[:, level, :, :, None]).sum(2)  # [B*heads, Q, C]
        output = term if output is None else output + term
        start = start + h * w
    output = output.view(batch, heads, queries, channels).transpose(1, 2)
    return output.reshape(batch, queries, heads * channels).to(out_dtype)
