"""Triton kernels for multi-scale deformable attention (the ``"triton"`` backend).

Importing this module imports :mod:`triton` and registers the custom operators
``detrkit::ms_deform_attn`` and ``detrkit::ms_deform_attn_backward`` (with fake tensor
implementations and autograd), so ``torch.compile`` traces through the op without a graph break.
:mod:`detrkit.ops.msda` imports it only when the backend is first used.

Layout of the work: one program per ``(query block, batch * head)``. A program loops over the
``L * P`` (level, point) pairs and holds a ``[BLOCK_Q, BLOCK_C]`` tile (``BLOCK_C``: ``C`` rounded up
to a power of two, extra channels masked): every bilinear corner is a gather of ``C`` contiguous
channels of ``value[b, s, h, :]``. ``BLOCK_Q`` and the warp count are autotuned on CUDA per
(query count bucket, heads, C, L, P, dtypes); ``DETRKIT_MSDA_AUTOTUNE=0`` uses a fixed choice.
Locations and weights are float32, the accumulation is float32, values may be
float32 / bfloat16 / float16 and the output has the dtype of the values.

The backward recomputes the corners (nothing per sample is stored by the forward), writes the
gradients of locations and weights directly and scatters the gradient of the values with
float32 atomic adds (so it is not bitwise deterministic from run to run).

If the environment variable ``TRITON_INTERPRET=1`` is set *before this module is imported*, the
kernels run in the Triton interpreter on CPU tensors (slow; for tests without a GPU).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from detrkit.ops.msda.triton_kernels import INTERPRETER, _msda_bwd_kernel, _msda_fwd_kernel

__all__ = ["INTERPRETER", "SUPPORTED_DTYPES", "ms_deform_attn_triton"]

#: Value dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- launch


def _check(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"triton ms_deform_attn supports values in {SUPPORTED_DTYPES}, got {value.dtype}"
        )
    if sampling_locations.dtype != torch.float32 or attention_weights.dtype != torch.float32:
        raise TypeError(
            "triton ms_deform_attn expects float32 sampling locations and attention weights"
        )
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            "expected value [B, S, heads, C], sampling_locations [B, Q, heads, L, P, 2], "
            "attention_weights [B, Q, heads, L, P]"
        )
    batch, seq, heads, channels = value.shape
    levels = spatial_shapes.shape[0]
    expected = (batch, sampling_locations.shape[1], heads, levels, sampling_locations.shape[4])
    if (
        tuple(sampling_locations.shape) != expected + (2,)
        or tuple(attention_weights.shape) != expected
    ):
        raise ValueError(
            f"inconsistent shapes: value {tuple(value.shape)}, {levels} levels, "
            f"sampling_locations {tuple(sampling_locations.shape)}, "
            f"attention_weights {tuple(attention_weights.shape)}"
        )
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"level_start_index must be [{levels}], got {tuple(level_start_index.shape)}"
        )
    if seq * heads * channels >= 2**31:
        raise ValueError("one batch element of value must have fewer than 2**31 elements")


def _meta(value: Tensor, sampling_locations: Tensor) -> dict[str, int | bool]:
    _, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    block_c = triton.next_power_of_2(channels)
    return dict(
        q_bucket=triton.next_power_of_2(max(queries, 1)),
        HEADS=heads,
        C=channels,
        L=levels,
        P=points,
        BLOCK_C=block_c,
        EVEN_C=block_c == channels,
    )


def _grid(batch: int, heads: int, queries: int):
    return lambda meta: (triton.cdiv(queries, meta["BLOCK_Q"]), batch * heads)


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.library.custom_op("detrkit::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    batch, seq, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    out = torch.empty(batch, queries, heads * channels, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    with _device_guard(value):
        _msda_fwd_kernel[_grid(batch, heads, queries)](
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            out,
            seq,
            queries,
            **_meta(value, sampling_locations),
        )
    return out


@_ms_deform_attn_op.register_fake
def _(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * channels)


@torch.library.custom_op("detrkit::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    grad_output = grad_output.contiguous()
    batch, seq, heads, _ = value.shape
    queries = sampling_locations.shape[1]
    # float32 accumulation buffer; it is the gradient itself for float32 values
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_weight = torch.empty_like(attention_weights)
    if grad_weight.numel() > 0:
        with _device_guard(value):
            _msda_bwd_kernel[_grid(batch, heads, queries)](
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                grad_output,
                grad_value,
                grad_loc,
                grad_weight,
                seq,
                queries,
                **_meta(value, sampling_locations),
            )
    else:
        grad_loc.zero_()
        grad_weight.zero_()
    return grad_value.to(value.dtype), grad_loc, grad_weight


@_ms_deform_attn_backward_op.register_fake
def _(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_loc, grad_weight = _ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_weight


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the Triton kernels.

    Args:
        value: ``[B, S, heads, C]`` float32 / bfloat16 / float16 on CUDA (or CPU in interpreter mode).
        spatial_shapes: ``[L, 2]`` int64 ``(H, W)`` rows, on the device of ``value``.
        level_start_index: ``[L]`` int64 offset of each level in ``S``, on the device of ``value``.
        sampling_locations: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` per level (cast to
            float32 here; the gradient comes back in the input dtype).
        attention_weights: ``[B, Q, heads, L, P]`` (cast to float32 here).

    Returns:
        ``[B, Q, heads * C]`` in the dtype of ``value``, accumulated in float32. Same conventions
        as :func:`detrkit.ops.msda.reference.ms_deform_attn_reference`.
    """
    device = value.device
    spatial_shapes = spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    level_start_index = level_start_index.to(device=device, dtype=torch.int64).contiguous()
    return _ms_deform_attn_op(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations.float(),
        attention_weights.float(),
    )
