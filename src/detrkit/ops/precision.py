"""Float32 islands inside a mixed-precision forward.

Under ``torch.autocast`` (bfloat16 on CPU / CUDA, float16 on CUDA) the convolutions, linear
layers and attention matmuls run in reduced precision. Coordinates must not: a bfloat16
number has 8 significant bits, so a sampling location or a reference box in ``[0, 1]`` would
be off by up to ``2**-9`` of the image (half a pixel of a 256 px level), an inverse sigmoid
near 0 or 1 loses its tail and a float16 offset overflows at 65504. Functions decorated with
:func:`float32_island` therefore run with autocast switched off and with their half-precision
tensor arguments upcast to float32 (float32 and float64 tensors are left as they are).

Without autocast (the default float32 or a float64 model) the decorator calls the function
unchanged, so float32 outputs are bit-identical with or without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["float32_island", "full_precision", "autocast_active"]

F = TypeVar("F", bound=Callable)

_HALF = (torch.bfloat16, torch.float16)


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32 if it is bfloat16 / float16; any other tensor unchanged (float64 stays
    float64, so a float64 model keeps its precision)."""
    return x.float() if x.dtype in _HALF else x


def autocast_active(device_type: str) -> bool:
    """Whether ``torch.autocast`` is enabled for ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast support
        return False


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def float32_island(fn: F) -> F:
    """Decorate ``fn`` to run in float32 under autocast.

    When autocast is enabled for the device of the first tensor argument, ``fn`` runs inside
    ``torch.autocast(device_type, enabled=False)`` with every bfloat16 / float16 tensor argument
    (positional or keyword, not inside containers) cast by :func:`full_precision`; its results
    are then float32. Otherwise ``fn`` is called as is. Gradients flow through the casts.
    """

    @functools.wraps(fn)
    def island(*args, **kwargs):
        first = _first_tensor(args, kwargs)
        if first is None or not autocast_active(first.device.type):
            return fn(*args, **kwargs)
        args = tuple(full_precision(a) if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: full_precision(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return island  # type: ignore[return-value]
