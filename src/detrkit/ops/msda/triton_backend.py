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

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETER", "SUPPORTED_DTYPES", "ms_deform_attn_triton"]

#: The kernels were created for the Triton interpreter (``TRITON_INTERPRET=1`` at import time).
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Value dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs(pairs: list[tuple[int, int]], default: tuple[int, int]) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_Q, num_warps)``; only ``default`` without autotuning."""
    if INTERPRETER:  # small blocks, so that tests cover several query blocks; nothing to tune
        pairs = [(16, 4)]
    elif os.environ.get("DETRKIT_MSDA_AUTOTUNE", "1") in ("0", ""):
        pairs = [default]
    return [triton.Config({"BLOCK_Q": bq}, num_warps=nw, num_stages=1) for bq, nw in pairs]


_FWD_CONFIGS = _configs([(16, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8)], default=(64, 8))
_BWD_CONFIGS = _configs([(16, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8)], default=(32, 8))
# Autotuning key: the query count only through its power-of-two bucket, so that training with
# varying image sizes does not re-tune for every new sequence length.
_TUNE_KEY = ["q_bucket", "HEADS", "C", "L", "P"]


@triton.jit
def _bilinear_setup(loc_ptr, weight_ptr, loc_off, w_off, q_mask, shapes_ptr, start_ptr, level, k):
    """Corner indices, validity masks and bilinear weights of point ``k`` (of level ``level``)."""
    height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
    start = tl.load(start_ptr + level).to(tl.int32)
    hf = height.to(tl.float32)
    wf = width.to(tl.float32)

    loc_x = tl.load(loc_ptr + loc_off + 2 * k, mask=q_mask, other=0.0)
    loc_y = tl.load(loc_ptr + loc_off + 2 * k + 1, mask=q_mask, other=0.0)
    attn = tl.load(weight_ptr + w_off + k, mask=q_mask, other=0.0)

    # pixel coordinates with pixel centres at integer + 0.5 (align_corners=False); clamping to
    # [-2, size + 1] leaves every corner of a clamped point outside the map, as it was before
    x = tl.minimum(tl.maximum(loc_x * wf - 0.5, -2.0), wf + 1.0)
    y = tl.minimum(tl.maximum(loc_y * hf - 0.5, -2.0), hf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)

    x0_in = (x0 >= 0) & (x0 < width)
    x1_in = (x0 >= -1) & (x0 < width - 1)
    y0_in = (y0 >= 0) & (y0 < height) & q_mask
    y1_in = (y0 >= -1) & (y0 < height - 1) & q_mask
    row0 = start + y0 * width + x0  # flattened index of the (y0, x0) corner
    row1 = row0 + width  # (y1, x0)
    return (attn, fx, fy, wf, hf, row0, row1,
            y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in)


@triton.jit
def _gather(v_base, row, valid, cols, col_mask, ROW_STRIDE: tl.constexpr, EVEN_C: tl.constexpr):
    """``value[row, cols]`` as float32 ``[BLOCK_Q, BLOCK_C]``, zero where ``valid`` is False."""
    ptrs = v_base + row[:, None] * ROW_STRIDE + cols[None, :]
    if EVEN_C:
        vals = tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        vals = tl.load(ptrs, mask=valid[:, None] & col_mask[None, :], other=0.0)
    return vals.to(tl.float32)


@triton.jit
def _scatter_add(g_base, row, valid, cols, col_mask, vals, ROW_STRIDE: tl.constexpr,
                 EVEN_C: tl.constexpr):
    """``grad[row, cols] += vals`` where ``valid`` (float32 atomics, relaxed ordering)."""
    ptrs = g_base + row[:, None] * ROW_STRIDE + cols[None, :]
    if EVEN_C:
        tl.atomic_add(ptrs, vals, mask=valid[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, vals, mask=valid[:, None] & col_mask[None, :], sem="relaxed")


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, weight_ptr, out_ptr,
    S, Q, q_bucket,
    HEADS: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C

    v_base = value_ptr + b.to(tl.int64) * S * (HEADS * C) + h * C
    row = (b.to(tl.int64) * Q + q) * HEADS + h  # index of (b, q, h)
    w_off = row * (L * P)
    loc_off = w_off * 2

    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    # a runtime loop over (level, point): unrolling all L * P points makes the compiler hoist every
    # gather and spill registers
    for k in range(L * P):
        (attn, fx, fy, wf, hf, row0, row1, m00, m01, m10, m11) = _bilinear_setup(
            loc_ptr, weight_ptr, loc_off, w_off, q_mask, shapes_ptr, start_ptr, k // P, k)
        gx = 1.0 - fx
        gy = 1.0 - fy
        v00 = _gather(v_base, row0, m00, cols, col_mask, HEADS * C, EVEN_C)
        v01 = _gather(v_base, row0 + 1, m01, cols, col_mask, HEADS * C, EVEN_C)
        v10 = _gather(v_base, row1, m10, cols, col_mask, HEADS * C, EVEN_C)
        v11 = _gather(v_base, row1 + 1, m11, cols, col_mask, HEADS * C, EVEN_C)
        acc += (
            v00 * (attn * gy * gx)[:, None]
            + v01 * (attn * gy * fx)[:, None]
            + v10 * (attn * fy * gx)[:, None]
            + v11 * (attn * fy * fx)[:, None]
        )

    out_ptrs = out_ptr + row[:, None] * C + cols[None, :]
    out_mask = q_mask[:, None] & col_mask[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, reset_to_zero=["grad_value_ptr"])
@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, weight_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
    S, Q, q_bucket,
    HEADS: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C

    batch_off = b.to(tl.int64) * S * (HEADS * C) + h * C
    v_base = value_ptr + batch_off
    gv_base = grad_value_ptr + batch_off
    row = (b.to(tl.int64) * Q + q) * HEADS + h
    w_off = row * (L * P)
    loc_off = w_off * 2

    g_ptrs = grad_out_ptr + row[:, None] * C + cols[None, :]
    g = tl.load(g_ptrs, mask=q_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)

    for k in range(L * P):
        (attn, fx, fy, wf, hf, row0, row1, m00, m01, m10, m11) = _bilinear_setup(
            loc_ptr, weight_ptr, loc_off, w_off, q_mask, shapes_ptr, start_ptr, k // P, k)
        gx = 1.0 - fx
        gy = 1.0 - fy
        v00 = _gather(v_base, row0, m00, cols, col_mask, HEADS * C, EVEN_C)
        v01 = _gather(v_base, row0 + 1, m01, cols, col_mask, HEADS * C, EVEN_C)
        v10 = _gather(v_base, row1, m10, cols, col_mask, HEADS * C, EVEN_C)
        v11 = _gather(v_base, row1 + 1, m11, cols, col_mask, HEADS * C, EVEN_C)

        # d out / d attn = <grad_out, bilinear sample>
        sample = (v00 * (gy * gx)[:, None] + v01 * (gy * fx)[:, None]
                  + v10 * (fy * gx)[:, None] + v11 * (fy * fx)[:, None])
        grad_attn = tl.sum(g * sample, axis=1)
        # d out / d loc = attn * <grad_out, d sample / d (fx, fy)> * (W, H)
        ga = g * attn[:, None]
        d_fx = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
        d_fy = gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
        grad_x = tl.sum(ga * d_fx, axis=1) * wf
        grad_y = tl.sum(ga * d_fy, axis=1) * hf

        tl.store(grad_weight_ptr + w_off + k, grad_attn, mask=q_mask)
        tl.store(grad_loc_ptr + loc_off + 2 * k, grad_x, mask=q_mask)
        tl.store(grad_loc_ptr + loc_off + 2 * k + 1, grad_y, mask=q_mask)

        # d out / d value: the bilinear weights times attn * grad_out, scattered to the corners
        _scatter_add(gv_base, row0, m00, cols, col_mask, ga * (gy * gx)[:, None], HEADS * C, EVEN_C)
        _scatter_add(gv_base, row0 + 1, m01, cols, col_mask, ga * (gy * fx)[:, None], HEADS * C, EVEN_C)
        _scatter_add(gv_base, row1, m10, cols, col_mask, ga * (fy * gx)[:, None], HEADS * C, EVEN_C)
        _scatter_add(gv_base, row1 + 1, m11, cols, col_mask, ga * (fy * fx)[:, None], HEADS * C, EVEN_C)


# ----------------------------------------------------------------------------- launch


def _check(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
           sampling_locations: Tensor, attention_weights: Tensor) -> None:
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton ms_deform_attn supports values in {SUPPORTED_DTYPES}, got {value.dtype}")
    if sampling_locations.dtype != torch.float32 or attention_weights.dtype != torch.float32:
        raise TypeError("triton ms_deform_attn expects float32 sampling locations and attention weights")
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError("expected value [B, S, heads, C], sampling_locations [B, Q, heads, L, P, 2], "
                         "attention_weights [B, Q, heads, L, P]")
    batch, seq, heads, channels = value.shape
    levels = spatial_shapes.shape[0]
    expected = (batch, sampling_locations.shape[1], heads, levels, sampling_locations.shape[4])
    if tuple(sampling_locations.shape) != expected + (2,) or tuple(attention_weights.shape) != expected:
        raise ValueError(f"inconsistent shapes: value {tuple(value.shape)}, {levels} levels, "
                         f"sampling_locations {tuple(sampling_locations.shape)}, "
                         f"attention_weights {tuple(attention_weights.shape)}")
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"level_start_index must be [{levels}], got {tuple(level_start_index.shape)}")
    if seq * heads * channels >= 2**31:
        raise ValueError("one batch element of value must have fewer than 2**31 elements")


def _meta(value: Tensor, sampling_locations: Tensor) -> dict[str, int | bool]:
    _, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    block_c = triton.next_power_of_2(channels)
    return dict(q_bucket=triton.next_power_of_2(max(queries, 1)), HEADS=heads, C=channels, L=levels,
                P=points, BLOCK_C=block_c, EVEN_C=block_c == channels)


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
def _ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                       sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
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
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
            seq, queries, **_meta(value, sampling_locations))
    return out


@_ms_deform_attn_op.register_fake
def _(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
      sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    batch, _, heads, channels = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * channels)


@torch.library.custom_op("detrkit::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
    sampling_locations: Tensor, attention_weights: Tensor,
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
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_output, grad_value, grad_loc, grad_weight,
                seq, queries, **_meta(value, sampling_locations))
    else:
        grad_loc.zero_()
        grad_weight.zero_()
    return grad_value.to(value.dtype), grad_loc, grad_weight


@_ms_deform_attn_backward_op.register_fake
def _(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
      sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_weight = _ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
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
    return _ms_deform_attn_op(value, spatial_shapes, level_start_index,
                              sampling_locations.float(), attention_weights.float())
