"""detrkit's own checkpoint format.

A checkpoint named ``<name>`` is two files side by side::

    <name>.safetensors   model weights (detrkit key names)
    <name>.json          {"format": "detrkit-checkpoint", "format_version", "detrkit_version",
                          "config": resolved Config, "label_map", "aliases", "extra": {...}}

and, for resuming training only, ``<name>.train.pt`` (optimizer / scheduler / RNG / step
state; read with ``torch.load(weights_only=True)``, so it may hold only tensors, numbers,
strings and containers).

``path`` arguments accept the prefix ``<name>``, either file, or a directory (then the name
is ``model``). Tensors shared by several keys (tied heads) are stored once; the JSON lists
the aliases and :func:`load_checkpoint` restores them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrkit.config import Config, ConfigError, from_dict, to_dict
from detrkit.engine.migrate import migrate_v1
from detrkit.structures import LabelMap

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "checkpoint_paths",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_train_state",
    "load_train_state",
]

FORMAT = "detrkit-checkpoint"
#: 2: one detection transformer (format 1, one class per family, is migrated on load)
FORMAT_VERSION = 2
_SUFFIXES = (".safetensors", ".json", ".train.pt")


def checkpoint_paths(path: str | Path) -> dict[str, Path]:
    """``{"weights", "meta", "train"}`` file paths of the checkpoint named by ``path``."""
    p = Path(path)
    if p.is_dir():
        prefix = p / "model"
    else:
        name = p.name
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        prefix = p.with_name(name)
    return {
        "weights": prefix.with_name(prefix.name + ".safetensors"),
        "meta": prefix.with_name(prefix.name + ".json"),
        "train": prefix.with_name(prefix.name + ".train.pt"),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detrkit")
    except PackageNotFoundError:  # pragma: no cover - source tree not installed
        return "unknown"


def _split_shared(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store every tensor once: returns (unique state, alias key -> stored key)."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
        if value.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = value.detach().cpu().contiguous()
    return unique, aliases


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    cfg: Config,
    label_map: LabelMap | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json``; returns the JSON path.

    Args:
        path: prefix, either file name, or a directory (name ``model``).
        model: the module or its state dict.
        cfg: the resolved config the model was built from.
        label_map: class index -> dataset id -> name (default: ``class_i``).
        extra: JSON-serialisable metadata (epoch, metrics, training batch size, source, ...).
    """
    from safetensors.torch import save_file

    paths = checkpoint_paths(path)
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    unique, aliases = _split_shared(state)
    label_map = label_map or LabelMap.default(cfg.model.num_classes)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "detrkit_version": _version(),
        "weights": paths["weights"].name,
        "config": to_dict(cfg),
        "label_map": label_map.to_json(),
        "aliases": aliases,
        "extra": dict(extra or {}),
    }
    save_file(unique, str(paths["weights"]), metadata={"format": FORMAT})
    paths["meta"].write_text(json.dumps(meta, indent=2, default=str))
    return paths["meta"]


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], Config, LabelMap, dict[str, Any]]:
    """Read a detrkit checkpoint.

    A checkpoint of an earlier format is migrated (:mod:`detrkit.engine.migrate`): ``state``
    and ``cfg`` are in the current layout; ``meta["format_version"]`` tells what was read.

    Returns:
        state: the weights (alias keys restored), on ``map_location``.
        cfg: the config (validated).
        label_map: the label map.
        meta: the rest of the JSON (``extra``, ``detrkit_version``, ...).
    """
    from safetensors.torch import load_file

    paths = checkpoint_paths(path)
    if not paths["meta"].is_file():
        raise FileNotFoundError(
            f"{paths['meta']}: detrkit checkpoint metadata not found "
            f"(expected <name>.json beside <name>.safetensors)"
        )
    try:
        meta = json.loads(paths["meta"].read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{paths['meta']}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{paths['meta']}: not a detrkit checkpoint (format={meta.get('format')!r})"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{paths['meta']}: format_version {meta['format_version']} is newer than "
            f"this detrkit supports ({FORMAT_VERSION}); upgrade detrkit"
        )
    weights = paths["meta"].with_name(meta.get("weights", paths["weights"].name))
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint weights not found")
    state = load_file(str(weights), device=str(map_location))
    for alias, stored in meta.get("aliases", {}).items():
        state[alias] = state[stored]
    config = meta["config"]
    if meta.get("format_version", 1) < 2:
        config, state = migrate_v1(config, state)
    try:
        cfg = from_dict(config).validate()
    except ConfigError as err:
        raise ValueError(f"{paths['meta']}: invalid config: {err}") from None
    label_map = LabelMap.from_json(meta["label_map"])
    return state, cfg, label_map, meta


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, Config, LabelMap, dict[str, Any]]:
    """Build the model of a detrkit checkpoint and load its weights strictly (eval mode)."""
    from detrkit.models import build_model

    state, cfg, label_map, meta = load_checkpoint(path, map_location)
    cfg.model.backbone.pretrained = False  # the weights come from the checkpoint
    model = build_model(cfg).to(map_location)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, label_map, meta


def save_train_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write the resume state (optimizer, scheduler, RNG, epoch...) to ``<name>.train.pt``.

    Values must be tensors, numbers, strings, ``None`` or containers of those (convert numpy
    RNG state to lists first), so that :func:`load_train_state` can use ``weights_only``.
    """
    target = checkpoint_paths(path)["train"]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), target)
    return target


def load_train_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``<name>.train.pt`` with ``torch.load(weights_only=True)``."""
    target = checkpoint_paths(path)["train"]
    if not target.is_file():
        raise FileNotFoundError(f"{target}: training state not found (cannot resume)")
    return torch.load(target, map_location=map_location, weights_only=True)
