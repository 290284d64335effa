"""Multi-scale deformable attention as one sparse-dense product (the ``"sparse"`` backend, CPU).

Each output row ``(b, h, q)`` is a weighted sum of ``L * P * 4`` rows of the value tensor: the
four bilinear neighbours of each sampling point, weighted by the bilinear weight times the
attention weight. Written as a CSR matrix ``M`` of ``B * heads * Q`` rows with ``L * P * 4``
entries each, over the ``B * heads * S`` rows of the values, the operator is ``M @ V``, which
PyTorch computes with a multi-threaded sparse kernel on contiguous value rows of ``C`` floats.
That avoids ``grid_sample``'s strided channel reads and the ``[B*heads, C, Q, L*P]``
intermediate of the reference, whose stacking and weighting are most of its time on CPU.

Backward: ``dV = M^T @ dOut`` and ``dM = (dOut @ V^T)`` sampled at ``M``'s entries
(:func:`torch.sparse.sampled_addmm`); the gradients of the locations and attention weights
then follow from the dense arithmetic that built ``M``'s entries. Neighbour indices come from
detached coordinates, as in the reference, where a location's gradient flows through the
bilinear weights only.

Same conventions as :func:`~detrkit.ops.msda.reference.ms_deform_attn_reference`: a location
``loc`` is the pixel coordinate ``loc * size - 0.5``; neighbours outside the map contribute zero.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from detrkit.ops.msda.reference import SpatialShapes, level_start_index_of, prepare_inputs

__all__ = ["ms_deform_attn_sparse"]

_INT32_LIMIT = 2**31 - 1


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _SampledSum(torch.autograd.Function):
    """``out[r] = sum_k values[r, k] * dense[col[r, k]]``: a CSR matrix of ``K`` entries per row
    times ``dense`` ``[R_in, C]``; differentiable in ``dense`` and ``values``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dense: Tensor, crow: Tensor, col: Tensor, values: Tensor, rows: int
    ) -> Tensor:
        matrix = _csr(crow, col, values, (rows, dense.shape[0]))
        ctx.save_for_backward(dense, crow, col, values)
        return torch.mm(matrix, dense)  # [rows, C]

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None, None]:
        dense, crow, col, values = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        matrix = _csr(crow, col, values, (grad_out.shape[0], dense.shape[0]))
        grad_dense = torch.mm(matrix.t(), grad_out) if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[3]:
            per_row = col.numel() // max(grad_out.shape[0], 1)
            if 4 * per_row < dense.shape[0]:
                # dValues[r, k] = <dOut[r], dense[col[r, k]]>: the product sampled at the entries
                sampled = torch.sparse.sampled_addmm(matrix, grad_out, dense.t(), beta=0.0)
                grad_values = sampled.values()
            else:  # tiny maps, where the entries outnumber the dense product (the sparse
                # kernel refuses that): gather the rows instead, [rows, K, C] at most a few MB
                rows = dense[col.long()].view(grad_out.shape[0], per_row, -1)
                grad_values = (rows * grad_out.unsqueeze(1)).sum(-1).reshape(-1)
        return grad_dense, None, None, grad_values, None


def _axis(coord: Tensor, size: Tensor, index_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The two neighbours along one axis of pixel coordinates ``coord`` ``[..., L, P]`` on maps of
    ``size`` ``[L, 1]`` (float): weights ``[..., L, P, 2]`` (zero outside the map) and indices
    ``[..., L, P, 2]`` clamped into the map (a NaN coordinate gets index 0, weight NaN)."""
    offsets = torch.tensor([0.0, 1.0], dtype=coord.dtype, device=coord.device)
    low = coord.detach().floor()
    frac = (coord - low).unsqueeze(-1)  # [..., L, P, 1]
    position = low.nan_to_num(0.0).unsqueeze(-1) + offsets  # [..., L, P, 2]
    last = size.unsqueeze(-1) - 1  # [L, 1, 1]
    inside = (position >= 0) & (position <= last)
    weight = torch.where(offsets.bool(), frac, 1 - frac)
    weight = torch.where(inside, weight, torch.zeros((), dtype=weight.dtype))
    index = torch.minimum(position.clamp(min=0), last).to(index_dtype)
    return weight, index


def ms_deform_attn_sparse(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention as a sparse-dense matrix product.

    Args:
        value: ``[B, S, heads, C]``, the flattened levels one after the other.
        spatial_shapes: ``(H, W)`` of each level (``[L, 2]`` int64 tensor or Python ints).
        sampling_locations: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` normalised to ``[0, 1]`` per
            level. Locations outside the map are allowed.
        attention_weights: ``[B, Q, heads, L, P]``.

    Returns:
        ``[B, Q, heads * C]`` in the dtype of ``value``, computed in float32 (float64 for
        float64 inputs). Equal to the reference up to float rounding (summation order);
        differentiable in all three tensors. Needs the tensors on the CPU.
    """
    out_dtype = value.dtype
    shapes, value, locs, weights = prepare_inputs(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    batch, total, heads, channels = value.shape
    _, queries, _, levels, points, _ = locs.shape
    rows, per_row = batch * heads * queries, levels * points * 4
    big = max(rows * per_row + 1, batch * heads * total) > _INT32_LIMIT
    index_dtype = torch.int64 if big else torch.int32

    sizes = torch.tensor(shapes, dtype=value.dtype, device=value.device)  # [L, 2] (h, w)
    height, width = sizes[:, :1], sizes[:, 1:]  # [L, 1]
    locs = locs.transpose(1, 2)  # [B, heads, Q, L, P, 2]
    weight_x, index_x = _axis(locs[..., 0] * width - 0.5, width, index_dtype)
    weight_y, index_y = _axis(locs[..., 1] * height - 0.5, height, index_dtype)
    weight_y = weight_y * weights.transpose(1, 2).unsqueeze(-1)  # [B, heads, Q, L, P, 2]
    entries = weight_y.unsqueeze(-1) * weight_x.unsqueeze(-2)  # [B, heads, Q, L, P, 2, 2]

    # first value row of each (b, head) block and level: (b * heads + h) * S + start_l
    starts = torch.tensor(level_start_index_of(shapes), dtype=index_dtype, device=value.device)
    blocks = torch.arange(batch * heads, dtype=index_dtype, device=value.device) * total
    base = blocks.view(batch, heads, 1, 1, 1, 1) + starts.view(levels, 1, 1)
    row_y = index_y * width.to(index_dtype).unsqueeze(-1) + base  # [B, heads, Q, L, P, 2]
    col = (row_y.unsqueeze(-1) + index_x.unsqueeze(-2)).reshape(-1)  # [rows * per_row]
    crow = torch.arange(0, rows * per_row + 1, per_row, dtype=index_dtype, device=value.device)

    dense = value.transpose(1, 2).reshape(batch * heads * total, channels)  # [B*heads*S, C]
    output = _SampledSum.apply(dense, crow, col, entries.reshape(-1), rows)  # [rows, C]
    output = output.view(batch, heads, queries, channels).transpose(1, 2)
    return output.reshape(batch, queries, heads * channels).to(out_dtype)
