"""Reading checkpoints written by earlier detrkit versions.

Format 1 (detrkit 0.1) had one transformer class per family, each with its own key layout and
config fields whose meaning depended on the family. Format 2 has one detection transformer:
:func:`migrate_v1` rewrites a format-1 config (as a plain dict) and state dict so that the
format-2 model built from the config reproduces the format-1 model's outputs exactly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from detrkit.models.attention import CROSS_PROJECTIONS, SELF_PROJECTIONS

__all__ = ["migrate_v1", "v1_family"]

# old prefix -> new prefix, per format-1 family ({i} = a layer index)
_COMMON = (("neck.proj.", "neck.layers.0.0."),)
_HEADS = (
    ("transformer.class_embed.", "transformer.heads.class_embed."),
    ("transformer.bbox_embed.", "transformer.heads.bbox_embed."),
    ("transformer.enc_class_embed.", "transformer.heads.enc_class_embed."),
    ("transformer.enc_bbox_embed.", "transformer.heads.enc_bbox_embed."),
    ("transformer.label_enc.", "transformer.denoising.label_enc."),
)
_CONDITIONAL = tuple(
    (
        f"transformer.decoder.layers.{{i}}.{side}_{name}.",
        f"transformer.decoder.layers.{{i}}.{'self' if side == 'sa' else 'cross'}_attn.{name}.",
    )
    for side, names in (("sa", SELF_PROJECTIONS), ("ca", CROSS_PROJECTIONS))
    for name in names
)
_NORM_SWAP = (
    ("transformer.decoder.layers.{i}.norm1.", "transformer.decoder.layers.{i}.norm2."),
    ("transformer.decoder.layers.{i}.norm2.", "transformer.decoder.layers.{i}.norm1."),
)
_ONE_HEAD = (
    ("transformer.class_embed.", "transformer.heads.class_embed.0."),
    ("transformer.bbox_embed.", "transformer.heads.bbox_embed.0."),
)
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "detr": _COMMON + _ONE_HEAD + (("transformer.query_embed.", "transformer.queries.query_pos."),),
    "dab": _COMMON
    + _ONE_HEAD
    + _CONDITIONAL
    + (
        ("transformer.refpoint_embed.", "transformer.queries.anchors."),
        ("transformer.patterns.", "transformer.queries.patterns."),
    ),
    "deformable": _NORM_SWAP
    + (
        ("transformer.reference_points.", "transformer.queries.reference_points."),
        ("transformer.two_stage_queries.", "transformer.queries."),
    ),
    "anchor_deformable": _NORM_SWAP
    + (
        ("transformer.tgt_embed.", "transformer.queries.content."),
        ("transformer.refpoint_embed.", "transformer.queries.anchors."),
        ("transformer.patterns_embed.", "transformer.queries.patterns."),
        ("transformer.query_selection.", "transformer.queries."),
    ),
}


def v1_family(model: Mapping[str, Any]) -> str:
    """Which format-1 transformer class a model config (dict) was built with."""
    global_attention = model.get("transformer", {}).get("attention", "global") == "global"
    kind = model.get("queries", {}).get("kind", "learned")
    if global_attention:
        return "detr" if kind == "learned" else "dab"
    return "deformable" if kind in ("reference_points", "two_stage") else "anchor_deformable"


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        pattern = "^" + re.escape(old).replace(re.escape("{i}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            index = match.group(1) if match.groups() else ""
            return new.replace("{i}", index) + key[match.end() :]
    return key


def _migrate_model_config(model: dict[str, Any], family: str) -> None:
    """Format-1 model config -> format 2 (in place): the fields that became explicit."""
    t, q, h = (
        model.setdefault("transformer", {}),
        model.setdefault("queries", {}),
        model.setdefault("heads", {}),
    )
    dn = model.setdefault("denoising", {})
    learned = q.pop("learned_content", True)
    kind, denoising = q.get("kind", "learned"), dn.get("kind", "none")
    model["neck"] = {"norm": "none" if family in ("detr", "dab") else "group_norm"}
    t["conditional_attention"] = t["encoder_query_scale"] = family == "dab"
    if family in ("detr", "dab"):
        t["decoder_norm"] = True
        t["msda_backend"] = "auto"
    if family == "dab":
        t["decoder_query_scale"] = True
        t.setdefault("modulate_hw_attn", True)
        h["share_decoder_class"] = h["share_decoder_box"] = True
        q["content"] = "label" if denoising == "dn" else "zero"
        dn["content_indicator"] = denoising == "dn"
        if q.get("box_update", "none") == "refine":  # format 1 kept the refined anchors' gradient
            q["box_update"] = "look_forward_twice"
    else:
        t["modulate_hw_attn"] = False
    if family == "detr":
        q["content"] = "zero"
    elif family == "deformable":
        q["content"] = "proposal" if kind == "two_stage" else "learned"
        t["decoder_query_scale"] = False
    elif family == "anchor_deformable":
        q["content"] = "learned" if learned or kind == "anchors" else "encoder"
    q["inverse_sigmoid_eps"] = 1e-3 if family in ("dab", "anchor_deformable") else 1e-5
    if family != "dab":  # format 1: null = one head exactly when boxes are not refined
        for key in ("share_decoder_class", "share_decoder_box"):
            if h.get(key) is None:
                h[key] = q.get("box_update", "none") == "none"
    for key in ("share_encoder_class", "share_encoder_box"):
        if kind == "two_stage":  # format 1 ignored the field: shared exactly without refinement
            h[key] = q.get("box_update", "none") == "none"
        elif kind != "mixed":
            h[key] = False


def migrate_v1(
    config: dict[str, Any],
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A format-1 config dict and state dict in the format-2 layout (new objects)."""
    config = copy.deepcopy(config)
    model = config.setdefault("model", {})
    family = v1_family(model)
    _migrate_model_config(model, family)
    config.setdefault("loss", {})["log_xy_hw"] = (
        family == "dab" or model["queries"].get("kind") == "mixed"
    )
    rules = _RULES[family] + _HEADS
    out: dict[str, Tensor] = {}
    hidden = int(model.get("transformer", {}).get("hidden_dim", 256))
    for key, value in state.items():
        if family == "deformable" and key == "transformer.query_embed.weight":
            out["transformer.queries.query_pos.weight"] = value[:, :hidden]
            out["transformer.queries.content.weight"] = value[:, hidden:]
            continue
        new = _rename(key, rules)
        if new == "transformer.queries.patterns.weight" and value.shape[-1] == hidden - 1:
            value = torch.cat([value, value.new_zeros(value.shape[0], 1)], -1)  # indicator 0
        out[new] = value
    return config, out
