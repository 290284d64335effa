"""Weights to start from, whatever wrote them: a detrkit checkpoint, a checkpoint published
with one of the five original code bases, or a Hugging Face model directory.

:func:`read_pretrained` tells the three apart and returns
:class:`~detrkit.engine.transfer.PretrainedWeights` (detrkit key layout, the config the
weights describe, their label map); :func:`start_model` builds a model of the same
architecture with any class count from them. ``detrkit train --init-from`` and
:meth:`detrkit.Detector.from_pretrained` use both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detrkit.config import Config, ConfigError, fit_to_classes
from detrkit.engine.transfer import (
    PretrainedWeights,
    TransferReport,
    adopt_model_config,
    transfer_weights,
)
from detrkit.models import DetectionModel
from detrkit.structures import LabelMap

__all__ = ["read_pretrained", "start_model", "describe_formats", "convert_checkpoint"]

OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def describe_formats() -> str:
    return (
        "a detrkit checkpoint (<name>.json + <name>.safetensors, or a run folder with "
        "checkpoint_best / checkpoint_last), an official checkpoint (.pth / .safetensors of "
        "DETR, Deformable DETR, DAB-DETR, DN-DETR or DINO) or a Hugging Face model folder "
        "(config.json + model.safetensors)"
    )


def _detrkit_stem(path: Path) -> Path | None:
    """The stem of a detrkit checkpoint at ``path`` (the stem, either file, or a run folder),
    or None when there is none."""
    from detrkit.engine.checkpoint import FORMAT

    if path.is_dir():
        for name in ("checkpoint_best", "checkpoint_last"):
            if (path / f"{name}.json").is_file():
                return path / name
        return None
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    meta = stem.with_name(stem.name + ".json")
    if not meta.is_file():
        return None
    try:
        return stem if json.loads(meta.read_text()).get("format") == FORMAT else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def read_pretrained(path: str | Path) -> PretrainedWeights:
    """Read the weights at ``path``; see the module docstring for what it may be.

    Raises:
        ConfigError: ``path`` is none of the three (one line naming it and what is accepted),
            or a Hugging Face folder of a model type detrkit does not read.
        FileNotFoundError: nothing at ``path``.
    """
    path = Path(path)
    if not path.exists() and not path.with_name(path.name + ".json").is_file():
        raise FileNotFoundError(f"{path}: no such file or folder (expected {describe_formats()})")
    stem = _detrkit_stem(path)
    if stem is not None:
        from detrkit.engine.checkpoint import load_checkpoint

        state, cfg, label_map, _ = load_checkpoint(stem)
        return PretrainedWeights(state, cfg, label_map, str(stem), "detrkit")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path}: a folder without config.json; expected {describe_formats()}"
            )
        from detrkit.convert import load_huggingface

        converted = load_huggingface(path)
        kind = "huggingface"
    elif path.suffix in OFFICIAL_SUFFIXES:
        from detrkit.convert import load_official

        try:
            converted = load_official(path)
        except (ValueError, KeyError, NotImplementedError) as err:
            reason = " ".join(str(err).split())
            raise ConfigError(
                f"{path}: cannot read it as an official checkpoint ({reason}); expected "
                f"{describe_formats()}"
            ) from None
        kind = "official"
    else:
        raise ConfigError(f"{path}: not a known weights format; expected {describe_formats()}")
    state = {k: v.detach() for k, v in converted.model.state_dict().items()}
    return PretrainedWeights(state, converted.config, converted.label_map, str(path), kind)


def start_model(
    weights: PretrainedWeights, num_classes: int | None = None
) -> tuple[DetectionModel, Config, LabelMap, TransferReport]:
    """A model of the weights' architecture with ``num_classes`` classes (None: theirs),
    loaded from them; the class heads and the denoising label embedding are re-initialised
    when the class count changes.

    Returns the model (eval mode), its config (the weights' with the new class count and the
    settings derived from it, see :func:`detrkit.config.fit_to_classes`), its label map (the
    weights' when the classes are kept, ``class_i`` names otherwise) and the transfer report.
    """
    import dataclasses

    from detrkit.models import build_model

    model_cfg = adopt_model_config(weights, num_classes)
    model_cfg.backbone = dataclasses.replace(model_cfg.backbone, pretrained=False)
    cfg, _ = fit_to_classes(dataclasses.replace(weights.config, model=model_cfg))
    cfg.validate()
    model = build_model(cfg)
    report = transfer_weights(model, weights)
    same = model_cfg.num_classes == weights.model.num_classes
    label_map = weights.label_map if same else LabelMap.default(model_cfg.num_classes)
    return model.eval(), cfg, label_map, report


def convert_checkpoint(
    src: str | Path | Mapping[str, Any],
    dst: str | Path,
    official_args: Any = None,
    label_map: LabelMap | None = None,
) -> Path:
    """Convert an official checkpoint into a detrkit checkpoint (``<dst>.safetensors`` +
    ``<dst>.json`` with the resolved config and label map). Returns the JSON path."""
    from detrkit.convert import load_official
    from detrkit.engine.checkpoint import save_checkpoint

    converted = load_official(src, official_args)
    extra = {
        "source": str(src) if not isinstance(src, Mapping) else "<state dict>",
        "family": converted.family,
        "official_args": converted.args,
    }
    return save_checkpoint(
        dst, converted.model, converted.config, label_map or converted.label_map, extra=extra
    )
