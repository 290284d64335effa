"""The multi-scale deformable attention layer of Deformable-DETR.

Parameter names, shapes, initialisation and the order of the arithmetic are those of the official
``MSDeformAttn``, so official checkpoints load without renaming and outputs match them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.ops.msda.dispatch import Backend, ms_deform_attn
from detrkit.ops.msda.reference import SpatialShapes, as_shape_list
from detrkit.ops.precision import float32_island

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: every query attends to ``n_points`` sampled locations per
    head and level around its reference point.

    State dict (as the official module): ``sampling_offsets`` ``[heads*levels*points*2, d]``,
    ``attention_weights`` ``[heads*levels*points, d]``, ``value_proj`` ``[d, d]``,
    ``output_proj`` ``[d, d]`` (all ``nn.Linear`` with bias).

    Args:
        d_model: hidden size ``d``; divisible by ``nheads``.
        n_levels: number of feature levels ``L``.
        nheads: number of attention heads.
        n_points: sampling points ``P`` per head and level.
        backend: operator backend, see :func:`detrkit.ops.msda.ms_deform_attn`.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        nheads: int = 8,
        n_points: int = 4,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if d_model % nheads != 0:
            raise ValueError(f"d_model must be divisible by nheads, got {d_model} and {nheads}")
        head_dim = d_model // nheads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"MSDeformAttn head dimension {head_dim} is not a power of 2; the triton "
                "kernels mask the extra channels, which wastes work",
                stacklevel=2,
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.nheads = nheads
        self.n_points = n_points
        self.backend: Backend = backend

        self.sampling_offsets = nn.Linear(d_model, nheads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, nheads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: offsets start on rings, one direction per head (angle
        ``2 pi i / heads``, scaled so that the larger component is 1), point ``p`` at distance
        ``p + 1``, identical for every level; uniform attention; xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.nheads, dtype=torch.float32) * (2.0 * math.pi / self.nheads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.nheads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: Tensor | None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the flattened multi-level ``value``.

        Args:
            query: ``[B, Q, d]`` (position embedding already added by the caller).
            reference_points: ``[B, Q, L, 2]`` ``(x, y)`` in ``[0, 1]`` per level, or
                ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)``; offsets are then scaled by half the box
                size divided by ``n_points``.
            value: ``[B, S, d]`` the levels flattened row-major, ``S = sum(H_l * W_l)``.
            spatial_shapes: ``[L, 2]`` int64 ``(H, W)`` per level, or ``(H, W)`` Python ints
                (the latter keeps the shapes static for ``torch.export``).
            level_start_index: ``[L]`` int64 start of each level in ``S`` (``None``: derived).
            padding_mask: ``[B, S]`` bool, ``True`` on padding (those values are zeroed), or ``None``.

        Returns:
            ``[B, Q, d]``.
        """
        batch, len_q, _ = query.shape
        _, len_in, _ = value.shape
        if not isinstance(spatial_shapes, Tensor):
            shapes = as_shape_list(spatial_shapes)
            if sum(h * w for h, w in shapes) != len_in:
                raise ValueError(
                    f"spatial shapes {shapes} do not add up to the input length {len_in}"
                )

        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], float(0))
        value = value.view(batch, len_in, self.nheads, self.d_model // self.nheads)
        sampling_offsets = self.sampling_offsets(query).view(
            batch, len_q, self.nheads, self.n_levels, self.n_points, 2
        )
        attention_logits = self.attention_weights(query).view(
            batch, len_q, self.nheads, self.n_levels * self.n_points
        )
        output = self._sample(
            value,
            sampling_offsets,
            attention_logits,
            reference_points,
            spatial_shapes,
            level_start_index,
        )
        return self.output_proj(output)

    @float32_island
    def _sample(
        self,
        value: Tensor,
        sampling_offsets: Tensor,
        attention_logits: Tensor,
        reference_points: Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: Tensor | None,
    ) -> Tensor:
        """Softmax of the attention logits ``[B, Q, heads, L*P]``, sampling locations and the
        sampling itself -> ``[B, Q, heads * C]``. A float32 island: under autocast the
        projections before it ran in reduced precision, everything here runs in float32 (the
        output is float32; ``output_proj`` casts it back down)."""
        batch, len_q = attention_logits.shape[:2]
        attention_weights = F.softmax(attention_logits, -1).view(
            batch, len_q, self.nheads, self.n_levels, self.n_points
        )
        sampling_locations = self.sampling_locations(
            reference_points, sampling_offsets, spatial_shapes
        )
        return ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            backend=self.backend,
        )

    def sampling_locations(
        self, reference_points: Tensor, offsets: Tensor, spatial_shapes: SpatialShapes
    ) -> Tensor:
        """Sampling locations ``[B, Q, heads, L, P, 2]``: the reference plus the offsets, in
        pixels of each level (2-D points) or in halves of the box size over ``P`` (boxes)."""
        if reference_points.shape[-1] == 2:
            if isinstance(spatial_shapes, Tensor):
                normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            else:
                normalizer = torch.tensor(
                    [[w, h] for h, w in as_shape_list(spatial_shapes)],
                    dtype=offsets.dtype,
                    device=offsets.device,
                )
            return (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        if reference_points.shape[-1] == 4:
            return (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        raise ValueError(
            f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}"
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, nheads={self.nheads}, "
            f"n_points={self.n_points}, backend={self.backend!r}"
        )
