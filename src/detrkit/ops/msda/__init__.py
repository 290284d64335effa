"""Multi-scale deformable attention (MSDA), the sampling operator of Deformable-DETR.

Conventions (the ones of the original Deformable-DETR op):

* ``value``: ``[B, S, heads, C]``, the ``L`` feature levels flattened row-major one after the other,
  ``S = sum(H_l * W_l)``.
* ``spatial_shapes``: ``[L, 2]`` int64 rows ``(H, W)``; ``level_start_index``: ``[L]`` int64 offset of
  each level in ``S``.
* ``sampling_locations``: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` normalised to ``[0, 1]`` per level.
  A location ``loc`` is the pixel coordinate ``loc * size - 0.5`` (pixel centres at ``i + 0.5``, as
  ``align_corners=False``); bilinear interpolation, neighbours outside the map contribute zero.
* ``attention_weights``: ``[B, Q, heads, L, P]`` (usually a softmax over ``L * P``).
* output: ``[B, Q, heads * C]``.

Backends: ``"reference"`` (pure PyTorch ``grid_sample``, any device, ONNX-exportable at opset
>= 16), ``"gather"`` (the same bilinear sampling with explicit gathers: any device, exports at any
opset without ``GridSample``), ``"sparse"`` (the sampling as one sparse-dense matrix product:
the fast CPU path, chosen by ``"auto"`` on the CPU) and ``"triton"`` (fused kernels for CUDA, a ``torch.library``
custom op ``detrkit::ms_deform_attn``).
Triton is imported only when the triton backend is first used.
"""

from detrkit.ops.msda.dispatch import (
    Backend,
    SpatialShapes,
    available_backends,
    ms_deform_attn,
    ms_deform_attn_reference,
)
from detrkit.ops.msda.gather import ms_deform_attn_gather
from detrkit.ops.msda.module import MSDeformAttn
from detrkit.ops.msda.sparse import ms_deform_attn_sparse

__all__ = [
    "ms_deform_attn_gather",
    "ms_deform_attn_sparse",
    "Backend",
    "SpatialShapes",
    "available_backends",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "MSDeformAttn",
]
