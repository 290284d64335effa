"""Which device a run uses, and deterministic mode."""

from __future__ import annotations

import os

import torch

from detrkit.config import ConfigError

__all__ = ["resolve_device", "use_deterministic_algorithms"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise ``torch.device(name)``,
    checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: '{name}' is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: '{name}' requested but CUDA is not available; use auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return device


def use_deterministic_algorithms(device: torch.device) -> None:
    """Deterministic algorithms only (``train.deterministic``): bitwise-repeatable runs on
    CPU; on CUDA the ops without a deterministic kernel warn instead of failing."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
