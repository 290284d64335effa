"""Mixed precision of the model forward.

``amp`` is one of ``"none"``, ``"bf16"`` (``torch.autocast`` with bfloat16, CUDA or CPU, no
loss scaling needed) and ``"fp16"`` (float16 with a ``torch.amp.GradScaler``, CUDA only).
Autocast covers the model forward; the model keeps its sampling and box arithmetic in float32
itself, and the criterion and post-processor receive float32 outputs (:func:`to_float32`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

from detrkit.config import ConfigError

__all__ = ["AmpMode", "autocast", "to_float32"]

AmpMode = Literal["none", "bf16", "fp16"]


def autocast(device: torch.device, amp: AmpMode) -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` on ``device`` (a no-op context for ``"none"``)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"train.amp: fp16 needs a CUDA device; use bf16 or none on {device.type}"
            )
        return torch.autocast("cuda", dtype=torch.float16)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.amp: '{amp}' is not one of ['none', 'bf16', 'fp16']")


def to_float32(value: Any) -> Any:
    """A copy of ``value`` (tensor, dataclass such as ``DetectorOutput``, list, tuple, dict)
    with every floating-point tensor in float32; other values are returned unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: to_float32(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value
