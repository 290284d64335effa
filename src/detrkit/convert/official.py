"""Loading checkpoints of the original research code (DETR, Deformable DETR, DAB/DN-DETR, DINO).

:func:`from_official` reads a checkpoint, decides which upstream family wrote it, turns the
upstream arguments (or, when absent, the tensor shapes) into a detrkit :class:`Config`, builds
the model and loads the renamed weights strictly. Each family lives in its own module that
exposes ``CONVERTER: FamilyConverter``; :data:`CONVERTERS` maps family -> module.

Architecture values are taken, per key, from ``official_args`` first, then from the
checkpoint's stored ``args``, then inferred from shapes (with a warning where a value cannot
be inferred and a default is used). The argument helpers the families share live in
:mod:`detrkit.convert.official_args` and are importable from here as well.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from detrkit.config import Config
from detrkit.convert.keymap import ConversionError, load_strict
from detrkit.convert.official_args import (
    Args,
    State,
    apply_training_args,
    arg,
    assume,
    backbone_config,
    count_indices,
    infer_backbone,
    need,
    pick,
    position_kind,
    resolve_num_classes,
    transformer_depth,
)
from detrkit.convert.state_io import args_to_dict, read_checkpoint
from detrkit.models.detector import DetectionModel, build_model
from detrkit.structures import LabelMap

__all__ = [
    "FamilyConverter",
    "OfficialModel",
    "CONVERTERS",
    "KNOWN_FAMILIES",
    "available_families",
    "get_converter",
    "detect_family",
    "from_official",
    "load_official",
    "official_to_config",
    "to_official_state_dict",
    "coco_label_map",
    "resolve_num_classes",
    "infer_backbone",
    "backbone_config",
    "count_indices",
    "arg",
    "pick",
    "assume",
    "apply_training_args",
    "position_kind",
    "need",
    "transformer_depth",
    "Args",
    "State",
]


@dataclass(frozen=True)
class FamilyConverter:
    """What one upstream family provides.

    to_config: ``(args, state) -> Config``; ``args`` may be partial or empty, ``state`` may be
        empty (then every needed value must be in ``args``).
    from_official: ``(state, cfg) -> (detrkit_state, unmatched_official_keys)``; aliases removed.
    to_official: ``(detrkit_state, cfg) -> official_state`` (alias keys included, as an
        official ``.pth`` holds them).
    """

    family: str
    to_config: Callable[[Args, State], Config]
    from_official: Callable[[State, Config], tuple[dict[str, Tensor], list[str]]]
    to_official: Callable[[State, Config], dict[str, Tensor]]


# family -> module exposing CONVERTER; a family whose module is absent is not supported yet
CONVERTERS: dict[str, str] = {
    "detr": "detrkit.convert.detr",
    "deformable_detr": "detrkit.convert.deformable_detr",
    "dab_detr": "detrkit.convert.dab_detr",
    "dn_dab_detr": "detrkit.convert.dab_detr",
    "dab_deformable_detr": "detrkit.convert.dab_deformable_detr",
    "dn_deformable_detr": "detrkit.convert.dab_deformable_detr",
    "dino": "detrkit.convert.dino",
}
KNOWN_FAMILIES = (
    "detr",
    "deformable_detr",
    "dab_detr",
    "dab_deformable_detr",
    "dn_dab_detr",
    "dn_deformable_detr",
    "dino",
)
_MODELNAME_FAMILY = {
    "dino": "dino",
    "dab_detr": "dab_detr",
    "dab_deformable_detr": "dab_deformable_detr",
    "dn_dab_detr": "dn_dab_detr",
    "dn_dab_deformable_detr": "dn_deformable_detr",
}


def available_families() -> list[str]:
    """Families whose converter module is installed."""
    return [f for f, mod in CONVERTERS.items() if importlib.util.find_spec(mod) is not None]


def get_converter(family: str) -> FamilyConverter:
    """The converter of ``family``; raises for unknown or not-yet-supported families."""
    if family not in KNOWN_FAMILIES:
        raise ConversionError(
            f"unknown model family '{family}'; known: {', '.join(KNOWN_FAMILIES)}"
        )
    module = CONVERTERS.get(family)
    if module is None or importlib.util.find_spec(module) is None:
        raise NotImplementedError(
            f"converting '{family}' checkpoints is not supported yet "
            f"(supported: {', '.join(available_families())})"
        )
    return importlib.import_module(module).CONVERTER


# ----------------------------------------------------------------------------- detection


def detect_family(state: State, args: Args | None = None) -> str:
    """The upstream family that wrote ``state`` (keys first, then ``args['modelname']`` /
    Deformable-only arguments). Raises :class:`ConversionError` when it cannot tell."""
    args = args or {}
    if any(k.startswith(("detr.", "bbox_attention.", "mask_head.")) for k in state):
        raise ConversionError(
            "this is a DETR segmentation (panoptic) checkpoint; only the "
            "detection models are supported"
        )
    multi = "transformer.level_embed" in state
    if "transformer.tgt_embed.weight" in state or "transformer.enc_out_class_embed.weight" in state:
        return "dino"
    if "label_enc.weight" in state:
        return "dn_deformable_detr" if multi else "dn_dab_detr"
    if "refpoint_embed.weight" in state:
        return "dab_deformable_detr" if multi else "dab_detr"
    if (
        multi
        or "transformer.reference_points.weight" in state
        or "transformer.enc_output.weight" in state
    ):
        return "deformable_detr"
    if (
        "query_embed.weight" in state
        and "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in state
    ):
        return "detr"
    modelname = args.get("modelname")
    if modelname is not None:
        if modelname not in _MODELNAME_FAMILY:
            raise ConversionError(f"official args: unknown modelname '{modelname}'")
        return _MODELNAME_FAMILY[modelname]
    if not state and args:
        deformable_args = ("num_feature_levels", "with_box_refine", "two_stage", "dec_n_points")
        return "deformable_detr" if any(k in args for k in deformable_args) else "detr"
    raise ConversionError(
        "cannot tell which model family wrote this checkpoint (no DETR, "
        "Deformable DETR, DAB/DN-DETR or DINO keys found); pass family=..."
    )


# ----------------------------------------------------------------------------- labels


# COCO 2017 category ids and names (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused)
_COCO_NAMES = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}


def coco_label_map(num_classes: int = 91) -> LabelMap:
    """The raw-id label map of the official COCO models: class index ``i`` = category id ``i``;
    unused ids are named ``N/A``."""
    ids = list(range(num_classes))
    return LabelMap(ids, [_COCO_NAMES.get(i, "N/A") for i in ids])


def _label_map(args: Args, num_classes: int) -> LabelMap:
    if (
        arg(args, "dataset_file") == "coco"
        and arg(args, "num_classes_override") is None
        and num_classes == 91
    ):
        return coco_label_map(91)
    return LabelMap.default(num_classes)


# ----------------------------------------------------------------------------- public API


@dataclass
class OfficialModel:
    """A converted official model with what describes it."""

    model: DetectionModel
    config: Config
    label_map: LabelMap
    family: str
    args: Args


def _merged_args(stored: Args | None, given: Any) -> Args:
    merged = dict(stored or {})
    merged.update(args_to_dict(given) or {})
    return merged


def load_official(
    checkpoint: str | Path | Mapping[str, Any], official_args: Any = None, family: str | None = None
) -> OfficialModel:
    """Convert an official checkpoint; see :func:`from_official`. Also returns the config,
    label map and family."""
    ckpt = read_checkpoint(checkpoint)
    args = _merged_args(ckpt.args, official_args)
    family = family or detect_family(ckpt.state, args)
    converter = get_converter(family)
    cfg = converter.to_config(args, ckpt.state)
    model = build_model(cfg)
    state, unmatched = converter.from_official(ckpt.state, cfg)
    load_strict(model, state, ckpt.source, unmatched)
    model.eval()
    return OfficialModel(model, cfg, _label_map(args, cfg.model.num_classes), family, args)


def from_official(
    checkpoint: str | Path | Mapping[str, Any], official_args: Any = None, family: str | None = None
) -> DetectionModel:
    """Build a detrkit :class:`~detrkit.models.DetectionModel` (eval mode) from an official checkpoint.

    Args:
        checkpoint: path to an official ``.pth`` (``{"model": state, "args": Namespace}``), a
            ``.safetensors`` file, or a state dict (official key names, aliases allowed).
        official_args: upstream arguments (dict or ``argparse.Namespace``); they override the
            checkpoint's stored args key by key. Missing values are inferred from the weights.
        family: force the upstream family instead of detecting it.

    Raises:
        ConversionError: unknown family, or weights that do not fit (lists the keys).
        NotImplementedError: a known family whose converter is not available yet.
    """
    return load_official(checkpoint, official_args, family).model


def official_to_config(args: Any, state: State | None = None, family: str | None = None) -> Config:
    """The detrkit config of an upstream argument namespace (``state`` helps infer values the
    args lack)."""
    args = args_to_dict(args) or {}
    state = state or {}
    family = family or detect_family(state, args)
    return get_converter(family).to_config(args, state)


def to_official_state_dict(model_state: State, cfg: Config, family: str) -> dict[str, Tensor]:
    """detrkit state dict -> the official key layout of ``family`` (with alias keys)."""
    return get_converter(family).to_official(model_state, cfg)
