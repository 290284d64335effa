"""Backend selection of :func:`ms_deform_attn` (see :mod:`detrkit.ops.msda`)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from detrkit.ops.msda.gather import ms_deform_attn_gather
from detrkit.ops.msda.reference import (
    SpatialShapes,
    as_shape_list,
    level_start_index_of,
    ms_deform_attn_reference,
)
from detrkit.ops.msda.sparse import ms_deform_attn_sparse
from detrkit.ops.tracing import is_tracing

__all__ = [
    "Backend",
    "SpatialShapes",
    "available_backends",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]

Backend = Literal["auto", "reference", "gather", "sparse", "triton"]
_BACKENDS = ("auto", "reference", "gather", "sparse", "triton")

# None: not tried yet; a module: imported; an exception: the import (or a first call) failed.
_triton_state: ModuleType | BaseException | None = None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_triton() -> ModuleType:
    """The triton backend module; raises (and remembers) why it cannot be used."""
    global _triton_state
    if _triton_state is None:
        try:
            if importlib.util.find_spec("triton") is None:
                raise ImportError("the triton package is not installed")
            from detrkit.ops.msda import triton_backend

            _triton_state = triton_backend
        except Exception as exc:
            _triton_state = exc
    if isinstance(_triton_state, BaseException):
        raise RuntimeError(
            f"the triton MSDA backend is unavailable: {_triton_state}"
        ) from _triton_state
    return _triton_state


def available_backends() -> list[str]:
    """Backends usable in this process: always ``"reference"``, ``"gather"`` and ``"sparse"`` (the
    last for CPU tensors); ``"triton"`` when Triton imports and either CUDA is available or
    ``TRITON_INTERPRET=1`` (interpreter on CPU). May import triton."""
    backends = ["reference", "gather", "sparse"]
    if torch.cuda.is_available() or _interpret_requested():
        try:
            module = _load_triton()
        except RuntimeError:
            return backends
        if torch.cuda.is_available() or module.INTERPRETER:
            backends.append("triton")
    return backends


def _triton_on_cpu_error() -> RuntimeError:
    return RuntimeError(
        "backend='triton' needs CUDA tensors (value is on the CPU). Set TRITON_INTERPRET=1 before "
        "the first use of the backend to run the kernels in the Triton interpreter on CPU (slow, "
        "for tests), or use backend='reference' / 'auto'."
    )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: Backend = "auto",
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: ``[B, S, heads, C]``.
        spatial_shapes: ``[L, 2]`` int64 ``(H, W)`` per level, or a sequence of ``(H, W)`` ints
            (needed as Python ints for ONNX export by ``torch.export``).
        level_start_index: ``[L]`` int64 start of each level in ``S``; ``None`` to derive it.
        sampling_locations: ``[B, Q, heads, L, P, 2]`` ``(x, y)`` normalised to ``[0, 1]`` per level.
        attention_weights: ``[B, Q, heads, L, P]``.
        backend: ``"reference"`` (PyTorch ``grid_sample``), ``"gather"`` (explicit bilinear
            gathers: exports at any opset without ``GridSample``), ``"sparse"`` (one sparse-dense
            product, CPU tensors only), ``"triton"`` (CUDA kernels; on CPU only with
            ``TRITON_INTERPRET=1``) or ``"auto"``: triton for CUDA values in float32 / bfloat16 /
            float16 when Triton imports and works, sparse for CPU values in eager mode, the
            reference otherwise (under ``torch.compile`` / ``torch.export`` on the CPU, and on
            other devices); never fails for lack of Triton.

    Returns:
        ``[B, Q, heads * C]`` in the dtype of ``value``; computed in float32 (float64 for float64
        inputs) whatever the value dtype. See the module docstring for the conventions.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown MSDA backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "reference":
        return ms_deform_attn_reference(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    if backend == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if backend == "sparse":
        if value.device.type != "cpu":
            raise RuntimeError(
                f"backend='sparse' needs CPU tensors (value is on {value.device}); use 'auto'"
            )
        return ms_deform_attn_sparse(value, spatial_shapes, sampling_locations, attention_weights)
    if backend == "auto":
        return _auto(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return _explicit_triton(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _explicit_triton(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """``backend="triton"``: the kernels, or an error saying why they cannot run here."""
    if not value.is_cuda and not _interpret_requested():
        raise _triton_on_cpu_error()
    module = _load_triton()
    if not value.is_cuda and not module.INTERPRETER:
        raise _triton_on_cpu_error()
    if value.dtype not in module.SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports values in {module.SUPPORTED_DTYPES}, got {value.dtype}; "
            "use backend='reference' (or 'auto') for this dtype"
        )
    shapes_t, starts_t = _shape_tensors(value, spatial_shapes, level_start_index)
    return module.ms_deform_attn_triton(
        value, shapes_t, starts_t, sampling_locations, attention_weights
    )


def _auto(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    global _triton_state
    if value.is_cuda and value.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            module = _load_triton()
        except RuntimeError:
            module = None
        if module is not None:
            shapes_t, starts_t = _shape_tensors(value, spatial_shapes, level_start_index)
            if torch.compiler.is_compiling():  # traced: failures surface at run time anyway
                return module.ms_deform_attn_triton(
                    value, shapes_t, starts_t, sampling_locations, attention_weights
                )
            try:
                return module.ms_deform_attn_triton(
                    value, shapes_t, starts_t, sampling_locations, attention_weights
                )
            except (ValueError, TypeError):  # bad arguments: the reference would fail as well
                raise
            except Exception as exc:
                _triton_state = exc
                warnings.warn(
                    f"triton MSDA backend failed ({exc}); using the reference backend from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
    if value.device.type == "cpu" and not is_tracing():
        return ms_deform_attn_sparse(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


def _shape_tensors(
    value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``spatial_shapes`` and ``level_start_index`` as int64 tensors on the device of ``value``."""
    if isinstance(spatial_shapes, Tensor):
        shapes_t = spatial_shapes.to(device=value.device, dtype=torch.int64)
    else:
        shapes_t = torch.tensor(
            as_shape_list(spatial_shapes), dtype=torch.int64, device=value.device
        )
    if level_start_index is None:
        if isinstance(spatial_shapes, Tensor):
            sizes = shapes_t[:, 0] * shapes_t[:, 1]
            starts_t = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        else:
            starts_t = torch.tensor(
                level_start_index_of(as_shape_list(spatial_shapes)),
                dtype=torch.int64,
                device=value.device,
            )
    else:
        starts_t = level_start_index.to(device=value.device, dtype=torch.int64)
    return shapes_t, starts_t
