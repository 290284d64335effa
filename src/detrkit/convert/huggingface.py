"""Hugging Face model directories (``save_pretrained`` of ``DetrForObjectDetection``,
``DeformableDetrForObjectDetection`` or ``DabDetrForObjectDetection``) -> detrkit models.

Nothing here imports transformers: ``config.json`` is read with :mod:`json` and the weights
with safetensors. The HF config fields become the upstream arguments of the official
converters (:mod:`detrkit.convert.detr`, ``deformable_detr``, ``dab_detr``), which build the
detrkit :class:`~detrkit.config.Config`; the HF keys are renamed by the :class:`KeyRule`
tables of :mod:`detrkit.convert.hf_keys` (HF layout -> detrkit layout)::

    model.backbone.conv_encoder.model.*        -> backbone.body.* (see hf_backbone)
    model.input_projection.* / input_proj.*    -> neck.layers.*
    model.encoder.layers.N.{self_attn_layer_norm,final_layer_norm,fc1,fc2}
                                               -> transformer.encoder.layers.N.{norm1,norm2,
                                                  linear1,linear2}
    model.decoder.layers.N.{self_attn,encoder_attn}_layer_norm / final_layer_norm
                                               -> ...decoder.layers.N.norm1 / norm2 / norm3
    model.decoder.layers.N.encoder_attn.*      -> ...decoder.layers.N.cross_attn.*
    *.{q,k,v}_proj.*  (global attention)       -> *.in_proj_{weight,bias} (concatenated q, k, v)
    class_labels_classifier / bbox_predictor   -> transformer.heads.{class,bbox}_embed.0 (DETR)
    [model.decoder.]{class,bbox}_embed.N       -> transformer.heads.{class,bbox}_embed.N /
                                                  enc_{class,bbox}_embed (Deformable, N = L)

The image input of the converted model is detrkit's: ``images [B,3,H,W]`` and a padding mask
``[B,H,W]`` with True on padding (HF's ``pixel_mask`` is the opposite: 1 on valid pixels).
The output boxes are normalised cxcywh, as HF's ``pred_boxes``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from detrkit.config import Config
from detrkit.convert import dab_detr, deformable_detr, detr
from detrkit.convert.hf_backbone import read_backbone
from detrkit.convert.hf_keys import hf_state_to_detrkit
from detrkit.convert.keymap import ConversionError, load_strict
from detrkit.convert.official import OfficialModel
from detrkit.models.detector import build_model
from detrkit.structures import LabelMap

__all__ = ["SUPPORTED_MODEL_TYPES", "is_huggingface_dir", "load_huggingface", "hf_to_config"]

SUPPORTED_MODEL_TYPES = ("detr", "deformable_detr", "dab-detr")

# ----------------------------------------------------------------------------- files


def is_huggingface_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose ``config.json`` holds a ``model_type``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; pass a save_pretrained folder")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; pass a Hugging Face save_pretrained directory "
            "(config.json + model.safetensors)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-save the model") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: no 'model_type'; this is not a Hugging Face model config")
    return data


def _read_weights(directory: Path) -> tuple[dict[str, Tensor], str]:
    """``model.safetensors`` (or the shards of ``model.safetensors.index.json``)."""
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single), device="cpu"), str(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(load_file(str(directory / shard), device="cpu"))
            return state, str(index)
    except Exception as err:  # safetensors / JSON raise their own error types
        raise ValueError(f"{directory}: unreadable safetensors weights ({err})") from None
    hint = (
        " (found pytorch_model.bin: re-save with save_pretrained(..., safe_serialization=True))"
        if (directory / "pytorch_model.bin").is_file()
        else ""
    )
    raise FileNotFoundError(
        f"{single}: not found{hint}; pass a directory written by save_pretrained"
    )


# ----------------------------------------------------------------------------- config


def _refuse(source: str, field: str, value: Any, hint: str) -> ConversionError:
    return ConversionError(f"{source}: {field}={value!r} is not supported; {hint}")


def _same(config: dict[str, Any], a: str, b: str, source: str) -> Any:
    """``config[a]``, refusing a different ``config[b]`` (detrkit has one value for both)."""
    if config.get(a) != config.get(b):
        raise _refuse(source, b, config.get(b), f"detrkit needs it equal to {a}={config.get(a)}")
    return config[a]


def _common_args(config: dict[str, Any], source: str, width: str) -> dict[str, Any]:
    """The upstream arguments every family shares, from the HF field names."""
    if config.get("position_embedding_type", "sine") != "sine":
        raise _refuse(
            source, "position_embedding_type", config["position_embedding_type"], "use sine"
        )
    if config.get("num_channels", 3) != 3:
        raise _refuse(source, "num_channels", config["num_channels"], "images have 3 channels")
    bb = read_backbone(config, source)
    args = {
        "backbone": bb.name,
        "dilation": bb.dilation,
        "hidden_dim": int(config[width]),
        "nheads": int(_same(config, "encoder_attention_heads", "decoder_attention_heads", source)),
        "enc_layers": int(config["encoder_layers"]),
        "dec_layers": int(config["decoder_layers"]),
        "dim_feedforward": int(_same(config, "encoder_ffn_dim", "decoder_ffn_dim", source)),
        "dropout": float(config.get("dropout", 0.1)),
        "aux_loss": bool(config.get("auxiliary_loss", False)),
        "position_embedding": "sine",
        "num_queries": int(config.get("num_queries", 100)),
    }
    for hf, official in (
        ("class_cost", "set_cost_class"),
        ("bbox_cost", "set_cost_bbox"),
        ("giou_cost", "set_cost_giou"),
        ("cls_loss_coefficient", "cls_loss_coef"),
        ("bbox_loss_coefficient", "bbox_loss_coef"),
        ("giou_loss_coefficient", "giou_loss_coef"),
        ("eos_coefficient", "eos_coef"),
        ("focal_alpha", "focal_alpha"),
    ):
        if config.get(hf) is not None:
            args[official] = config[hf]
    return args


def _check_levels(out: tuple[int, ...] | None, wanted: tuple[int, ...], source: str) -> None:
    if out is not None and out != wanted and not (wanted == (4,) and out[-1] == 4):
        raise _refuse(
            source, "backbone_config.out_indices", list(out), f"detrkit reads stages {list(wanted)}"
        )


def _activation(config: dict[str, Any], source: str, allowed: tuple[str, ...]) -> str:
    value = config.get("activation_function", allowed[0])
    if value not in allowed:
        raise _refuse(source, "activation_function", value, f"supported: {', '.join(allowed)}")
    return str(value)


def hf_to_config(config: dict[str, Any], num_classes: int, source: str = "config.json") -> Config:
    """The detrkit config of an HF ``config.json`` dict; ``num_classes`` = real classes
    (HF ``num_labels``). Raises :class:`ConversionError` naming a field detrkit cannot
    represent."""
    kind = config.get("model_type")
    if kind == "detr":
        args = _common_args(config, source, "d_model")
        _activation(config, source, ("relu",))
        _check_levels(read_backbone(config, source).out_indices, (4,), source)
        return detr.to_config(dict(args, pre_norm=False, num_classes=num_classes), {})
    if kind == "deformable_detr":
        args = _common_args(config, source, "d_model")
        _activation(config, source, ("relu",))
        levels = int(config.get("num_feature_levels", 4))
        wanted = (2, 3, 4) if levels > 1 else (4,)
        _check_levels(read_backbone(config, source).out_indices, wanted, source)
        two_stage = bool(config.get("two_stage", False))
        if two_stage:
            args["num_queries"] = int(config.get("two_stage_num_proposals", 300))
        args.update(
            num_feature_levels=levels,
            enc_n_points=int(config.get("encoder_n_points", 4)),
            dec_n_points=int(config.get("decoder_n_points", 4)),
            two_stage=two_stage,
            with_box_refine=bool(config.get("with_box_refine", False)),
            num_classes=num_classes,
        )
        return deformable_detr.to_config(args, {})
    if kind == "dab-detr":
        args = _common_args(config, source, "hidden_size")
        for field, ok in (
            ("query_dim", 4),
            ("keep_query_pos", False),
            ("normalize_before", False),
            ("num_patterns", 0),
        ):
            if config.get(field, ok) != ok:
                raise _refuse(source, field, config[field], f"detrkit supports {ok!r} only")
        scale = config.get("sine_position_embedding_scale")
        if scale is not None and not math.isclose(float(scale), 2 * math.pi):
            raise _refuse(source, "sine_position_embedding_scale", scale, "use null (2*pi)")
        _check_levels(read_backbone(config, source).out_indices, (4,), source)
        args.update(
            modelname="dab_detr",
            transformer_activation=_activation(config, source, ("prelu", "relu", "gelu")),
            num_patterns=0,
            random_refpoints_xy=bool(config.get("random_refpoints_xy", False)),
            pe_temperatureH=config.get("temperature_height", 20),
            pe_temperatureW=config.get("temperature_width", 20),
            num_classes=num_classes,
        )
        return dab_detr.to_config(args, {})
    raise ConversionError(
        f"{source}: model_type {kind!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


# ----------------------------------------------------------------------------- public API


def _class_count(config: dict[str, Any], state: dict[str, Tensor], source: str) -> int:
    """HF ``num_labels``: the class head's rows (DETR: minus the no-object row)."""
    kind = config.get("model_type")
    key = {
        "detr": "class_labels_classifier.weight",
        "dab-detr": "class_embed.weight",
    }.get(kind, "")
    for candidate in (key, "class_embed.0.weight", "model.decoder.class_embed.0.weight"):
        if candidate in state:
            rows = int(state[candidate].shape[0])
            return rows - 1 if kind == "detr" else rows
    raise ConversionError(f"{source}: no class head weights found; the file is incomplete")


def _label_map(config: dict[str, Any], num_classes: int, source: str) -> LabelMap:
    """Class index ``i`` -> id ``i``, name ``id2label[i]`` (``N/A`` where absent)."""
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    if id2label and max(id2label) >= num_classes:
        raise ConversionError(
            f"{source}: id2label has index {max(id2label)} but the class head has "
            f"{num_classes} classes; fix id2label in config.json"
        )
    return LabelMap(list(range(num_classes)), [id2label.get(i, "N/A") for i in range(num_classes)])


def load_huggingface(directory: str | Path) -> OfficialModel:
    """Load a Hugging Face ``save_pretrained`` directory as a detrkit model (eval mode).

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` of a
            ``DetrForObjectDetection``, ``DeformableDetrForObjectDetection`` (plain,
            ``with_box_refine``, ``two_stage``) or ``DabDetrForObjectDetection``.

    Returns:
        :class:`OfficialModel`: the model, its config, the label map (HF class order,
        names from ``id2label``), ``family`` ``"hf:<model_type>"`` and ``args`` (the
        config.json dict). DETR has ``num_labels + 1`` logits (last = no object).

    Raises:
        FileNotFoundError: no config.json or no model.safetensors.
        ConversionError: an unsupported ``model_type`` or option (named), or weights that
            do not fit (lists the keys).
    """
    directory = Path(directory)
    config = _read_config(directory)
    source = str(directory / "config.json")
    if config["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type {config['model_type']!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    read_backbone(config, source)  # refuse an unsupported backbone before reading weights
    state, weights = _read_weights(directory)
    num_classes = _class_count(config, state, weights)
    cfg = hf_to_config(config, num_classes, source)
    model = build_model(cfg)
    renamed, unmatched = hf_state_to_detrkit(state, cfg, config, weights)
    load_strict(model, renamed, weights, unmatched)
    model.eval()
    label_map = _label_map(config, num_classes, source)
    return OfficialModel(model, cfg, label_map, f"hf:{config['model_type']}", config)
