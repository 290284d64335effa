"""Loading checkpoints of the original research code (DETR, Deformable DETR, DAB/DN-DETR, DINO).

:func:`from_official` reads a checkpoint, decides which upstream family wrote it, turns the
upstream arguments (or, when absent, the tensor shapes) into a detrkit :class:`Config`, builds
the model and loads the renamed weights strictly. Each family lives in its own module that
exposes ``CONVERTER: FamilyConverter``; :data:`CONVERTERS` maps family -> module.

Architecture values are taken, per key, from ``official_args`` first, then from the
checkpoint's stored ``args``, then inferred from shapes (with a warning where a value cannot
be inferred and a default is used).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from torch import Tensor

from detrkit.config import BackboneConfig, Config, TransformerConfig
from detrkit.convert.keymap import ConversionError, load_strict
from detrkit.convert.state_io import args_to_dict, read_checkpoint
from detrkit.models.detector import Detector, build_model
from detrkit.structures import LabelMap

__all__ = [
    "FamilyConverter", "OfficialModel", "CONVERTERS", "KNOWN_FAMILIES", "available_families",
    "get_converter", "detect_family", "from_official", "load_official", "official_to_config",
    "to_official_state_dict", "convert_checkpoint", "coco_label_map", "resolve_num_classes",
    "infer_backbone", "backbone_config", "count_indices", "arg", "pick", "assume",
    "apply_training_args",
    "position_kind", "need",
]

Args = dict[str, Any]
State = Mapping[str, Tensor]


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
KNOWN_FAMILIES = ("detr", "deformable_detr", "dab_detr", "dab_deformable_detr", "dn_dab_detr",
                  "dn_deformable_detr", "dino")
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
        raise ConversionError(f"unknown model family '{family}'; known: {', '.join(KNOWN_FAMILIES)}")
    module = CONVERTERS.get(family)
    if module is None or importlib.util.find_spec(module) is None:
        raise NotImplementedError(f"converting '{family}' checkpoints is not supported yet "
                                  f"(supported: {', '.join(available_families())})")
    return importlib.import_module(module).CONVERTER


# ----------------------------------------------------------------------------- detection


def detect_family(state: State, args: Args | None = None) -> str:
    """The upstream family that wrote ``state`` (keys first, then ``args['modelname']`` /
    Deformable-only arguments). Raises :class:`ConversionError` when it cannot tell."""
    args = args or {}
    if any(k.startswith(("detr.", "bbox_attention.", "mask_head.")) for k in state):
        raise ConversionError("this is a DETR segmentation (panoptic) checkpoint; only the "
                              "detection models are supported")
    multi = "transformer.level_embed" in state
    if "transformer.tgt_embed.weight" in state or "transformer.enc_out_class_embed.weight" in state:
        return "dino"
    if "label_enc.weight" in state:
        return "dn_deformable_detr" if multi else "dn_dab_detr"
    if "refpoint_embed.weight" in state:
        return "dab_deformable_detr" if multi else "dab_detr"
    if multi or "transformer.reference_points.weight" in state or \
            "transformer.enc_output.weight" in state:
        return "deformable_detr"
    if "query_embed.weight" in state and \
            "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in state:
        return "detr"
    modelname = args.get("modelname")
    if modelname is not None:
        if modelname not in _MODELNAME_FAMILY:
            raise ConversionError(f"official args: unknown modelname '{modelname}'")
        return _MODELNAME_FAMILY[modelname]
    if not state and args:
        deformable_args = ("num_feature_levels", "with_box_refine", "two_stage", "dec_n_points")
        return "deformable_detr" if any(k in args for k in deformable_args) else "detr"
    raise ConversionError("cannot tell which model family wrote this checkpoint (no DETR, "
                          "Deformable DETR, DAB/DN-DETR or DINO keys found); pass family=...")


# ----------------------------------------------------------------------------- shared helpers


def arg(args: Args, name: str) -> Any:
    """``args[name]``, or ``None`` when absent or null."""
    return args.get(name)


def pick(args: Args, name: str, infer: Callable[[], Any]) -> Any:
    """``args[name]`` when given, else ``infer()`` (e.g. a value read from the tensor shapes)."""
    value = arg(args, name)
    return infer() if value is None else value


def assume(name: str, value: Any) -> Any:
    """Warn that ``name`` cannot be inferred and ``value`` is assumed; return ``value``."""
    warnings.warn(f"official args: '{name}' cannot be inferred from the weights; assuming "
                  f"{value}. Pass official_args={{'{name}': ...}} if that is wrong", stacklevel=4)
    return value


def position_kind(args: Args, state: State) -> Literal["sine", "learned"]:
    """The official ``position_embedding`` (``sine``/``v2`` or ``learned``/``v3``); without it,
    ``learned`` when the weights hold the learned row embedding."""
    value = arg(args, "position_embedding")
    if value is None:
        return "learned" if "backbone.1.row_embed.weight" in state else "sine"
    if value in ("sine", "v2"):
        return "sine"
    if value in ("learned", "v3"):
        return "learned"
    raise ConversionError(f"official args: position_embedding '{value}' is not supported "
                          "(sine/v2 or learned/v3)")


def apply_training_args(cfg: Config, args: Args) -> None:
    """Copy the matcher / loss coefficients and the optimiser schedule of the official
    arguments (``set_cost_*``, ``*_loss_coef``, ``eos_coef``, ``focal_alpha``, ``lr*``,
    ``weight_decay``, ``clip_max_norm``, ``epochs``, ``lr_drop``, ``batch_size``) into ``cfg``
    (in place); the families share these names and meanings."""
    loss, tr = cfg.loss, cfg.train
    for field_name, key, obj in (
        ("cost_class", "set_cost_class", loss.matcher),
        ("cost_bbox", "set_cost_bbox", loss.matcher),
        ("cost_giou", "set_cost_giou", loss.matcher), ("class_weight", "cls_loss_coef", loss),
        ("bbox_weight", "bbox_loss_coef", loss), ("giou_weight", "giou_loss_coef", loss),
        ("eos_coef", "eos_coef", loss), ("focal_alpha", "focal_alpha", loss),
        ("lr", "lr", tr), ("lr_backbone", "lr_backbone", tr),
        ("lr_linear_proj_mult", "lr_linear_proj_mult", tr), ("weight_decay", "weight_decay", tr),
        ("clip_max_norm", "clip_max_norm", tr),
    ):
        if arg(args, key) is not None:
            setattr(obj, field_name, float(args[key]))
    for field_name, key in (("epochs", "epochs"), ("lr_drop", "lr_drop"),
                            ("batch_size", "batch_size")):
        if arg(args, key) is not None:
            setattr(tr, field_name, int(args[key]))


def count_indices(state: State, prefix: str) -> int:
    """``1 + max i`` over keys ``{prefix}{i}.*`` (0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def need(state: State, key: str, what: str) -> Tensor:
    """``state[key]``, or a :class:`ConversionError` saying ``what`` cannot be determined."""
    if key not in state:
        raise ConversionError(f"official args: '{what}' is missing and cannot be inferred "
                              f"(no '{key}' in the state dict); pass it in official_args")
    return state[key]


def transformer_depth(args: Args, state: State, t: TransformerConfig) -> None:
    """Set ``enc_layers``, ``dec_layers`` and ``dim_feedforward`` of ``t`` from ``args``, else
    from the weights (layers by counting ``transformer.{encoder,decoder}.layers.i``, the
    feed-forward width from the first decoder layer), the same in every family."""
    t.enc_layers = int(pick(args, "enc_layers",
                            lambda: count_indices(state, "transformer.encoder.layers.")))
    t.dec_layers = int(pick(args, "dec_layers",
                            lambda: count_indices(state, "transformer.decoder.layers.")))
    t.dim_feedforward = int(pick(args, "dim_feedforward", lambda: need(
        state, "transformer.decoder.layers.0.linear1.weight", "dim_feedforward").shape[0]))


def infer_backbone(state: State) -> str:
    """ResNet depth from the backbone keys: block type and the number of layer3 blocks."""
    blocks = count_indices(state, "backbone.0.body.layer3.")
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    table = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18",
             (False, 6): "resnet34"}
    name = table.get((bottleneck, blocks))
    if name is None:
        raise ConversionError(f"cannot identify the ResNet from backbone.0.body.* "
                              f"({'bottleneck' if bottleneck else 'basic'} blocks, {blocks} in "
                              "layer3); only resnet18/34/50/101 are supported")
    return name


def backbone_config(args: Args, state: State) -> BackboneConfig:
    """``model.backbone`` from ``backbone`` / ``dilation`` / ``lr_backbone`` args and the keys."""
    name = arg(args, "backbone")
    inferred = infer_backbone(state) if state else None
    if name is None:
        if inferred is None:
            raise ConversionError("official args: 'backbone' is missing and there is no state "
                                  "dict to infer it from")
        name = inferred
    elif name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ConversionError(f"official args: backbone '{name}' is not supported "
                              "(resnet18/34/50/101)")
    elif inferred is not None and inferred != name:
        raise ConversionError(f"official args say backbone={name} but the weights are a {inferred}")
    dilation = arg(args, "dilation")
    if dilation is None:
        warnings.warn("official args: 'dilation' (DC5) cannot be inferred from the weights; "
                      "assuming False. Pass official_args={'dilation': True} for DC5 models",
                      stacklevel=3)
        dilation = False
    lr_backbone = arg(args, "lr_backbone")
    frozen = 4 if lr_backbone is not None and lr_backbone <= 0 else 1
    return BackboneConfig(name=name, dilation=bool(dilation), pretrained=False,
                          frozen_stages=frozen)


def resolve_num_classes(args: Args, shape_classes: int | None, source: str = "checkpoint") -> int:
    """Number of real classes: ``num_classes_override`` > ``num_classes`` > the dataset
    (``coco`` 91, ``coco_panoptic`` 250) > the class-head shape. When the weights disagree
    with the arguments the weights win (with a warning). ``shape_classes``: from the head."""
    from_args = None
    for key in ("num_classes_override", "num_classes"):
        if arg(args, key) is not None:
            from_args = int(args[key])
            break
    if from_args is None:
        from_args = {"coco": 91, "coco_panoptic": 250}.get(arg(args, "dataset_file"))
    if shape_classes is None:
        if from_args is None:
            raise ConversionError("official args: cannot determine num_classes (no "
                                  "num_classes / dataset_file and no class head weights)")
        return from_args
    if from_args is not None and from_args != shape_classes:
        warnings.warn(f"{source}: the arguments imply {from_args} classes but the class head "
                      f"has {shape_classes}; using {shape_classes}", stacklevel=3)
    return shape_classes


# COCO 2017 category ids and names (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused)
_COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana",
    53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors",
    88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def coco_label_map(num_classes: int = 91) -> LabelMap:
    """The raw-id label map of the official COCO models: class index ``i`` = category id ``i``;
    unused ids are named ``N/A``."""
    ids = list(range(num_classes))
    return LabelMap(ids, [_COCO_NAMES.get(i, "N/A") for i in ids])


def _label_map(args: Args, num_classes: int) -> LabelMap:
    if arg(args, "dataset_file") == "coco" and arg(args, "num_classes_override") is None \
            and num_classes == 91:
        return coco_label_map(91)
    return LabelMap.default(num_classes)


# ----------------------------------------------------------------------------- public API


@dataclass
class OfficialModel:
    """A converted official model with what describes it."""

    model: Detector
    config: Config
    label_map: LabelMap
    family: str
    args: Args


def _merged_args(stored: Args | None, given: Any) -> Args:
    merged = dict(stored or {})
    merged.update(args_to_dict(given) or {})
    return merged


def load_official(checkpoint: str | Path | Mapping[str, Any], official_args: Any = None,
                  family: str | None = None) -> OfficialModel:
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


def from_official(checkpoint: str | Path | Mapping[str, Any], official_args: Any = None,
                  family: str | None = None) -> Detector:
    """Build a detrkit :class:`Detector` (eval mode) from an official checkpoint.

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


def convert_checkpoint(src: str | Path | Mapping[str, Any], dst: str | Path,
                       official_args: Any = None, label_map: LabelMap | None = None) -> Path:
    """Convert an official checkpoint into a detrkit checkpoint (``<dst>.safetensors`` +
    ``<dst>.json`` with the resolved config and label map). Returns the JSON path."""
    from detrkit.checkpoint import save_checkpoint

    converted = load_official(src, official_args)
    extra = {"source": str(src) if not isinstance(src, Mapping) else "<state dict>",
             "family": converted.family, "official_args": converted.args}
    return save_checkpoint(dst, converted.model, converted.config,
                           label_map or converted.label_map, extra=extra)
