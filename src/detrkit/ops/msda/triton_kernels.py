"""The Triton kernels of multi-scale deformable attention (see
:mod:`detrkit.ops.msda.triton_backend` for the layout of the work and how they are launched)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["INTERPRETER", "_msda_fwd_kernel", "_msda_bwd_kernel"]

#: The kernels were created for the Triton interpreter (``TRITON_INTERPRET=1`` at import time).
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    return (
        attn,
        fx,
        fy,
        wf,
        hf,
        row0,
        row1,
        y0_in & x0_in,
        y0_in & x1_in,
        y1_in & x0_in,
        y1_in & x1_in,
    )


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
def _scatter_add(
    g_base, row, valid, cols, col_mask, vals, ROW_STRIDE: tl.constexpr, EVEN_C: tl.constexpr
):
    """``grad[row, cols] += vals`` where ``valid`` (float32 atomics, relaxed ordering)."""
    ptrs = g_base + row[:, None] * ROW_STRIDE + cols[None, :]
    if EVEN_C:
        tl.atomic_add(ptrs, vals, mask=valid[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, vals, mask=valid[:, None] & col_mask[None, :], sem="relaxed")


@triton.jit
def _gather_corners(
    v_base, row0, row1, m00, m01, m10, m11, cols, col_mask, ROW: tl.constexpr, EVEN_C: tl.constexpr
):
    """The four bilinear corners ``[BLOCK_Q, BLOCK_C]`` float32 (top-left, top-right,
    bottom-left, bottom-right)."""
    return (
        _gather(v_base, row0, m00, cols, col_mask, ROW, EVEN_C),
        _gather(v_base, row0 + 1, m01, cols, col_mask, ROW, EVEN_C),
        _gather(v_base, row1, m10, cols, col_mask, ROW, EVEN_C),
        _gather(v_base, row1 + 1, m11, cols, col_mask, ROW, EVEN_C),
    )


@triton.jit
def _scatter_corners(
    g_base, row0, row1, m00, m01, m10, m11, cols, col_mask, ga, gx, gy, fx, fy,
    ROW: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """Add ``ga`` times each corner's bilinear weight to the gradient of that corner."""
    _scatter_add(g_base, row0, m00, cols, col_mask, ga * (gy * gx)[:, None], ROW, EVEN_C)
    _scatter_add(g_base, row0 + 1, m01, cols, col_mask, ga * (gy * fx)[:, None], ROW, EVEN_C)
    _scatter_add(g_base, row1, m10, cols, col_mask, ga * (fy * gx)[:, None], ROW, EVEN_C)
    _scatter_add(g_base, row1 + 1, m11, cols, col_mask, ga * (fy * fx)[:, None], ROW, EVEN_C)


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, weight_ptr, out_ptr,
    S, Q, q_bucket,
    HEADS: tl.constexpr, C: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
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
        (attn, fx, fy, _wf, _hf, row0, row1, m00, m01, m10, m11) = _bilinear_setup(
            loc_ptr, weight_ptr, loc_off, w_off, q_mask, shapes_ptr, start_ptr, k // P, k
        )
        gx = 1.0 - fx
        gy = 1.0 - fy
        v00, v01, v10, v11 = _gather_corners(
            v_base, row0, row1, m00, m01, m10, m11, cols, col_mask, HEADS * C, EVEN_C
        )
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
):  # fmt: skip
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
            loc_ptr, weight_ptr, loc_off, w_off, q_mask, shapes_ptr, start_ptr, k // P, k
        )
        gx = 1.0 - fx
        gy = 1.0 - fy
        v00, v01, v10, v11 = _gather_corners(
            v_base, row0, row1, m00, m01, m10, m11, cols, col_mask, HEADS * C, EVEN_C
        )
        # d out / d attn = <grad_out, bilinear sample>
        sample = (
            v00 * (gy * gx)[:, None]
            + v01 * (gy * fx)[:, None]
            + v10 * (fy * gx)[:, None]
            + v11 * (fy * fx)[:, None]
        )
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
        _scatter_corners(
            gv_base, row0, row1, m00, m01, m10, m11, cols, col_mask, ga, gx, gy, fx, fy,
            HEADS * C, EVEN_C,
        )  # fmt: skip
