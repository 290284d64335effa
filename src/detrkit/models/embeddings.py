"""Small shared pieces: the MLP, sine embeddings of coordinates, box refinement.

Sine embeddings: a coordinate ``x`` (normalised, times ``scale``) is divided by ``F``
frequencies ``temperature ** (2 (k // 2) / F)`` and gives ``(sin f0, cos f1, sin f2, ...)``;
the frequencies are float32 (as in every official implementation), so the result is float32
for float32 or lower-precision inputs and float64 for float64 inputs.

Box arithmetic (:func:`box_sine_embedding`, :func:`refine_boxes`) is a float32 island
(:func:`~detrkit.ops.precision.float32_island`): under autocast it runs with autocast off on
float32 copies of half-precision inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.boxes import inverse_sigmoid
from detrkit.ops.precision import float32_island

__all__ = [
    "MLP",
    "sine_frequencies",
    "sine_features",
    "box_sine_embedding",
    "refine_boxes",
    "gather_tokens",
    "build_activation",
    "Activation",
]

Activation = Literal["relu", "gelu", "prelu"]

#: coordinate order of :func:`box_sine_embedding` for DAB-DETR / DINO anchors: (y, x, w, h)
YXWH = (1, 0, 2, 3)
#: coordinate order of two-stage Deformable DETR proposals: (x, y, w, h)
XYWH = (0, 1, 2, 3)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (none after the last).

    State dict: ``layers.{i}.weight/bias`` (the official layout of ``bbox_embed``).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim]`` -> ``[..., output_dim]``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def build_activation(name: Activation) -> nn.Module:
    """The FFN activation as a module (``prelu``: one learned slope, as in DAB-DETR)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "prelu":
        return nn.PReLU()
    raise ValueError(f"model.transformer.activation: unknown activation '{name}'")


def sine_frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    """``[F]`` float32 ``temperature ** (2 (k // 2) / F)``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def sine_features(values: Tensor, frequencies: Tensor) -> Tensor:
    """``values`` ``[...]`` (already scaled) -> ``[..., F]`` interleaved sin / cos."""
    pos = values[..., None] / frequencies
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


@float32_island
def box_sine_embedding(
    coords: Tensor,
    num_feats: int,
    order: Sequence[int] = YXWH,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> Tensor:
    """Sine embedding of normalised coordinates, concatenated in ``order``.

    Args:
        coords: ``[..., k]`` normalised ``(cx, cy, w, h)`` boxes (``k = 4``) or ``(x, y)``
            points (``k = 2``).
        num_feats: frequencies per coordinate ``F`` (``d / 2``).
        order: which coordinates, in which order (default ``(y, x, w, h)``); indices past
            ``k`` are dropped, so points give ``(y, x)``.

    Returns:
        ``[..., len(order') * F]`` (``order'`` = the indices below ``k``).
    """
    freqs = sine_frequencies(num_feats, temperature, coords.device)
    k = coords.shape[-1]
    if k not in (2, 4):
        raise ValueError(
            f"box_sine_embedding: expected [..., 2] or [..., 4], got {tuple(coords.shape)}"
        )
    return torch.cat([sine_features(coords[..., i] * scale, freqs) for i in order if i < k], -1)


@float32_island
def refine_boxes(delta: Tensor, reference: Tensor | None, eps: float) -> Tensor:
    """Apply a box head's output to a reference in inverse-sigmoid space.

    Args:
        delta: ``[..., 4]`` head output (offsets of ``(cx, cy, w, h)`` before the sigmoid).
        reference: ``[..., 4]`` normalised cxcywh boxes, ``[..., 2]`` normalised points (only
            the centre is offset; ``w, h`` come from ``delta`` alone) or ``None`` (the box is
            ``sigmoid(delta)``).
        eps: clamp of :func:`~detrkit.boxes.inverse_sigmoid`.

    Returns:
        ``[..., 4]`` normalised cxcywh boxes (float32 under autocast).
    """
    if reference is None:
        return delta.sigmoid()
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    centre = delta[..., :2] + inverse_sigmoid(reference, eps)
    return torch.cat([centre, delta[..., 2:]], -1).sigmoid()


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``[B, S, k]`` at ``index`` ``[B, Q]`` (int64 token indices) -> ``[B, Q, k]``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
