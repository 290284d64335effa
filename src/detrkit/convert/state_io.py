"""Reading published checkpoints safely: ``.pth`` pickles and safetensors files.

A ``.pth`` is read with ``torch.load(weights_only=True)``; the only class allow-listed is
``argparse.Namespace`` (the official training scripts store their arguments in it), so a file
that needs anything else to unpickle is refused rather than executed.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["OfficialCheckpoint", "read_checkpoint", "args_to_dict"]


@dataclass
class OfficialCheckpoint:
    """A state dict with the arguments it was trained with (``None`` when not stored)."""

    state: dict[str, Tensor]
    args: dict[str, Any] | None
    source: str


def args_to_dict(args: Any) -> dict[str, Any] | None:
    """``argparse.Namespace`` / mapping / ``None`` -> a plain dict (or ``None``)."""
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise TypeError(
        f"official args: expected a dict or argparse.Namespace, got {type(args).__name__}"
    )


def _load_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refusing to load: the pickle needs objects other than tensors, containers "
            f"and argparse.Namespace ({str(err).splitlines()[0]}). Re-save the state dict with "
            "torch.save({'model': state_dict}) or as safetensors"
        ) from None
    except RuntimeError as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    args = None
    if "args" in metadata:  # optional: official args stored as JSON metadata
        try:
            args = json.loads(metadata["args"])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: metadata 'args' is not valid JSON") from None
    return state, args


def _unwrap(obj: Any, source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Find the state dict (and args) inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source}: expected a state dict or a dict with a 'model' entry, "
            f"got {type(obj).__name__}"
        )
    args = args_to_dict(obj.get("args")) if "args" in obj else None
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), args
    return dict(obj), args


def read_checkpoint(src: str | Path | Mapping[str, Any]) -> OfficialCheckpoint:
    """Read an official checkpoint from a ``.pth`` / ``.safetensors`` path or a dict.

    Accepted layouts: ``{"model": state_dict, "args": Namespace, ...}`` (official training
    scripts), ``{"state_dict": ...}``, or a bare state dict. A ``module.`` prefix left by
    DistributedDataParallel on every key is removed.
    """
    if isinstance(src, Mapping):
        state, args = _unwrap(src, "state dict")
        source = "<state dict>"
    else:
        path = Path(src)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        if path.suffix == ".safetensors":
            state, args = _load_safetensors(path)
        else:
            state, args = _unwrap(_load_pickle(path), source)
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: state dict entries are not tensors: {bad[:5]}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return OfficialCheckpoint(state=state, args=args, source=source)
