"""Hugging Face DETR-family state-dict keys -> detrkit keys (see :mod:`detrkit.convert.huggingface`
for the table of renamings).

Global attention: HF's separate ``q_proj`` / ``k_proj`` / ``v_proj`` become one
``in_proj_{weight,bias}``. Deformable DETR: the class / box heads exist at the top level and,
for refinement / two-stage, again under ``model.decoder.`` (tied copies); transformers 5 saves
one copy of tied tensors, so the heads are gathered from either place first.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from detrkit.config import Config
from detrkit.convert.hf_backbone import HF_BACKBONE_PREFIX, backbone_rules, read_backbone
from detrkit.convert.keymap import ConversionError, KeyRule, per_layer_head_rules, rename
from detrkit.models.attention import CROSS_PROJECTIONS, SELF_PROJECTIONS

__all__ = ["IGNORED", "hf_state_to_detrkit"]

# HF tensors with no detrkit counterpart (batch-norm step counters)
IGNORED = (r"\.num_batches_tracked$",)

_ENC, _DEC = "model.encoder.layers.{n}.", "model.decoder.layers.{n}."
_TENC, _TDEC = "transformer.encoder.layers.{n}.", "transformer.decoder.layers.{n}."
_ENCODER_RULES = tuple(
    KeyRule(_ENC + a, _TENC + b)
    for a, b in (
        ("self_attn_layer_norm.", "norm1."),
        ("final_layer_norm.", "norm2."),
        ("fc1.", "linear1."),
        ("fc2.", "linear2."),
        ("activation_fn.", "activation."),
        ("self_attn.", "self_attn."),
    )
)
_DECODER_RULES = tuple(
    KeyRule(_DEC + a, _TDEC + b)
    for a, b in (
        ("self_attn_layer_norm.", "norm1."),
        ("encoder_attn_layer_norm.", "norm2."),
        ("final_layer_norm.", "norm3."),
        ("fc1.", "linear1."),
        ("fc2.", "linear2."),
        ("self_attn.", "self_attn."),
        ("encoder_attn.", "cross_attn."),
    )
) + (KeyRule("model.decoder.layernorm.", "transformer.decoder.norm."),)
_DETR_RULES = (
    KeyRule("model.input_projection.", "neck.layers.0.0."),
    KeyRule("model.query_position_embeddings.", "transformer.queries.query_pos."),
    KeyRule("class_labels_classifier.", "transformer.heads.class_embed.0."),
    KeyRule("bbox_predictor.", "transformer.heads.bbox_embed.0."),
)
_QUERY_EMBED = "model.query_position_embeddings.weight"
_DEFORMABLE_RULES = (
    KeyRule("model.input_proj.{level}.{part}.", "neck.layers.{level}.{part}."),
    KeyRule("model.level_embed", "transformer.level_embed"),
    KeyRule("model.reference_points.", "transformer.queries.reference_points."),
    KeyRule(_QUERY_EMBED, "hf.query_embed"),  # split after renaming
) + tuple(
    KeyRule(f"model.{p}.", f"transformer.queries.{p}.")
    for p in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
)
# HF DAB-DETR attention projection names -> detrkit's (same order as the official sa_/ca_)
_DAB_SELF = ("query_content", "query_pos", "key_content", "key_pos", "value")
_DAB_CROSS = _DAB_SELF + ("query_pos_sine",)
_DAB_RULES = (
    tuple(
        KeyRule(f"{_DEC}{attn}.{attn}_{hf}_proj.", f"{_TDEC}{attn}.{ours}.")
        for attn, hf_names, our_names in (
            ("self_attn", _DAB_SELF, SELF_PROJECTIONS),
            ("cross_attn", _DAB_CROSS, CROSS_PROJECTIONS),
        )
        for hf, ours in zip(hf_names, our_names)
    )
    + tuple(
        KeyRule(_DEC + a, _TDEC + b)
        for a, b in (
            ("self_attn.self_attn.output_proj.", "self_attn.out_proj."),
            ("self_attn.self_attn_layer_norm.", "norm1."),
            ("cross_attn.cross_attn.output_proj.", "cross_attn.out_proj."),
            ("cross_attn.cross_attn_layer_norm.", "norm2."),
            ("mlp.fc1.", "linear1."),
            ("mlp.fc2.", "linear2."),
            ("mlp.final_layer_norm.", "norm3."),
            ("mlp.activation_fn.", "activation."),
        )
    )
    + tuple(
        KeyRule(f"model.{part}.{p}.", f"transformer.{part}.{p}.")
        for part, p in (
            ("encoder", "query_scale"),
            ("decoder", "query_scale"),
            ("decoder", "ref_point_head"),
            ("decoder", "ref_anchor_head"),
        )
    )
    + (
        KeyRule("model.decoder.layernorm.", "transformer.decoder.norm."),
        KeyRule("model.input_projection.", "neck.layers.0.0."),
        KeyRule("model.query_refpoint_embeddings.", "transformer.queries.anchors."),
        KeyRule("class_embed.", "transformer.heads.class_embed.0."),
        KeyRule("bbox_predictor.", "transformer.heads.bbox_embed.0."),
    )
)


# ----------------------------------------------------------------------------- weights


def _fuse_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate ``q_proj`` / ``k_proj`` / ``v_proj`` of HF's global attention ->
    ``in_proj_{weight,bias}`` ``[3d, d]`` / ``[3d]`` (q, k, v stacked, as nn.MultiheadAttention)."""
    out = dict(state)
    for key in [k for k in state if k.endswith((".q_proj.weight", ".q_proj.bias"))]:
        base, kind = key.rsplit(".q_proj.", 1)
        parts = [f"{base}.{p}_proj.{kind}" for p in ("q", "k", "v")]
        if all(p in state for p in parts):
            out[f"{base}.in_proj_{kind}"] = torch.cat([out.pop(p) for p in parts], 0)
    return out


def _deformable_heads(state: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """HF's class / box heads (top-level and ``model.decoder.`` copies, tied or not) ->
    ``{class,bbox}_embed.{i}.*`` of the official layout. Transformers 5 ties the refining
    model's class heads to ``class_embed.0`` and saves only that one: an index missing from
    the file is taken from index 0, as HF does."""
    layers = cfg.model.transformer.dec_layers
    refine = cfg.model.queries.box_update != "none"
    num_pred = layers + 1 if cfg.model.queries.kind == "two_stage" else layers
    out = {k: v for k, v in state.items() if not k.startswith(("class_embed.", "bbox_embed."))}
    out = {
        k: v
        for k, v in out.items()
        if not k.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed."))
    }
    for head in ("class_embed", "bbox_embed"):
        found: list[dict[str, Tensor]] = []
        for i in range(num_pred):
            entry: dict[str, Tensor] = {}
            for prefix in (f"{head}.{i}.", f"model.decoder.{head}.{i}."):
                for key in [k for k in state if k.startswith(prefix)]:
                    rest, value = key[len(prefix) :], state[key]
                    if rest in entry and not torch.equal(entry[rest], value):
                        raise ConversionError(
                            f"{source}: '{key}' differs from its tied copy; re-save the model"
                        )
                    entry[rest] = value
            found.append(entry if entry or not found else found[0])
        keep = range(num_pred) if refine else range(1)
        for i in range(num_pred):
            if (
                not refine
                and i > 0
                and any(not torch.equal(v, found[0].get(r, v)) for r, v in found[i].items())
            ):
                raise ConversionError(
                    f"{source}: {head}.{i} differs from {head}.0 but with_box_refine=false "
                    "shares one head; the config does not match the weights"
                )
        for i in keep:
            out.update({f"{head}.{i}.{r}": v for r, v in found[i].items()})
    # heads beyond the model's are kept under their HF names: strict loading reports them
    pattern = re.compile(r"(model\.decoder\.)?(class|bbox)_embed\.(\d+)\.")
    for key, value in state.items():
        m = pattern.match(key)
        if m and int(m.group(3)) >= num_pred:
            out["hf." + key] = value
    return out


def _rules(cfg: Config, kind: str, layout: str) -> tuple[KeyRule, ...]:
    common = backbone_rules(layout) + _ENCODER_RULES
    if kind == "detr":
        return common + _DECODER_RULES + _DETR_RULES
    if kind == "dab-detr":
        return common + _DAB_RULES
    heads: tuple[KeyRule, ...] = ()
    q, layers = cfg.model.queries, cfg.model.transformer.dec_layers
    if q.kind == "two_stage" and q.box_update != "none":
        heads = (
            KeyRule(f"class_embed.{layers}.", "transformer.heads.enc_class_embed."),
            KeyRule(f"bbox_embed.{layers}.", "transformer.heads.enc_bbox_embed."),
        )
    return common + _DECODER_RULES + _DEFORMABLE_RULES + heads + per_layer_head_rules()


def hf_state_to_detrkit(
    state: dict[str, Tensor], cfg: Config, config: dict[str, Any], source: str = "weights"
) -> tuple[dict[str, Tensor], list[str]]:
    """HF state dict -> detrkit keys, and the HF keys no rule placed."""
    kind = config["model_type"]
    layout = read_backbone(config, source).layout
    if layout == "timm" and any(k.startswith(HF_BACKBONE_PREFIX + "embedder.") for k in state):
        layout = "hf"  # weights win over a config that names a timm backbone
    state = _fuse_qkv(state)
    if kind == "deformable_detr":
        state = _deformable_heads(state, cfg, source)
    out, unmatched = rename(state, _rules(cfg, kind, layout), ignore=IGNORED)
    unmatched = [k.removeprefix("hf.") for k in unmatched]
    joint = out.pop("hf.query_embed", None)
    if joint is not None:  # [Q, 2d]: positional half first, then the content half
        half = joint.shape[1] // 2
        out["transformer.queries.query_pos.weight"] = joint[:, :half]
        out["transformer.queries.content.weight"] = joint[:, half:]
    return out, unmatched
