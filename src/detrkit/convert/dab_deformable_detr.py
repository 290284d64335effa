"""IDEA-Research/DAB-DETR ``dab_deformable_detr`` and IDEA-Research/DN-DETR
``dn_dab_deformable_detr`` checkpoints (``DABDeformableDETR`` of either repository).

Official layout -> detrkit layout (``L`` = decoder layers)::

    backbone.0.body.*                         -> backbone.body.*
    backbone.1.{row,col}_embed.* (learned)    -> position.{row,col}_embed.*
    input_proj.{i}.{0,1}.*                    -> neck.layers.{i}.{0,1}.*
    transformer.level_embed / encoder.* / decoder.layers.* / decoder.query_scale.* /
    decoder.ref_point_head.*                  -> the same names (decoder layers: norm1 and
                                                 norm2 swapped)
    tgt_embed.* / refpoint_embed.* / patterns_embed.*
                                              -> transformer.queries.content.* / anchors.* /
                                                 patterns.*
    label_enc.* (DN)                          -> transformer.denoising.label_enc.*
    class_embed.{i}.* / bbox_embed.{i}.*      -> transformer.heads.class_embed.{i}.* / ...

Box refinement is hard-wired in both repositories, so every decoder layer has its own heads;
``transformer.decoder.bbox_embed.{i}`` is an alias of ``bbox_embed.{i}`` (checked, dropped,
written back by :func:`to_official`). DN-Deformable-DETR is recognised by ``use_dn`` /
``modelname`` in the arguments or by the ``label_enc`` weights; its content queries are
``hidden_dim - 1`` wide plus the denoising indicator. Two-stage checkpoints are refused: the
official two-stage variant fails in its own decoder.

The helpers :func:`alias_map` / :func:`add_aliases` (prefix-based alias groups) are shared
with :mod:`detrkit.convert.dino`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from detrkit.config import Config, DenoisingConfig, QueryConfig, TransformerConfig
from detrkit.convert.deformable_detr import heads_and_points, sine_or_learned_position
from detrkit.convert.keymap import (
    BACKBONE_RULES,
    DEFORMABLE_DECODER_RULES,
    LEARNED_POSITION_RULES,
    MULTI_LEVEL_NECK_RULES,
    ConversionError,
    KeyRule,
    drop_aliases,
    per_layer_head_rules,
    rename,
)
from detrkit.convert.official import FamilyConverter
from detrkit.convert.official_args import (
    Args,
    State,
    apply_training_args,
    arg,
    backbone_config,
    need,
    pick,
    resolve_num_classes,
    transformer_depth,
)
from detrkit.presets import get_preset

__all__ = [
    "RULES",
    "alias_prefixes",
    "alias_map",
    "add_aliases",
    "is_denoising",
    "to_config",
    "from_official",
    "to_official",
    "CONVERTER",
]

RULES: tuple[KeyRule, ...] = (
    BACKBONE_RULES
    + LEARNED_POSITION_RULES
    + MULTI_LEVEL_NECK_RULES
    + DEFORMABLE_DECODER_RULES
    + (
        KeyRule("transformer.level_embed", "transformer.level_embed"),
        KeyRule("transformer.encoder.", "transformer.encoder."),
        KeyRule("transformer.decoder.query_scale.", "transformer.decoder.query_scale."),
        KeyRule("transformer.decoder.ref_point_head.", "transformer.decoder.ref_point_head."),
        KeyRule("tgt_embed.", "transformer.queries.content."),
        KeyRule("refpoint_embed.", "transformer.queries.anchors."),
        KeyRule("patterns_embed.", "transformer.queries.patterns."),
        KeyRule("label_enc.", "transformer.denoising.label_enc."),
    )
    + per_layer_head_rules()
)

Prefixes = Sequence[tuple[str, str]]  # (alias prefix, canonical prefix), official names


def alias_map(state: State, prefixes: Prefixes) -> dict[str, str]:
    """Alias key -> canonical key for every key of ``state`` under an alias prefix."""
    out: dict[str, str] = {}
    for key in state:
        for alias, canonical in prefixes:
            if key.startswith(alias):
                out[key] = canonical + key[len(alias) :]
                break
    return out


def add_aliases(state: dict[str, Tensor], prefixes: Prefixes) -> dict[str, Tensor]:
    """Write, in place, every alias key of ``prefixes`` from its canonical key; returns
    ``state``."""
    for alias, canonical in prefixes:
        for key in [k for k in state if k.startswith(canonical)]:
            state[alias + key[len(canonical) :]] = state[key]
    return state


def alias_prefixes(cfg: Config) -> list[tuple[str, str]]:
    """The decoder's alias of the per-layer box heads."""
    return [
        (f"transformer.decoder.bbox_embed.{i}.", f"bbox_embed.{i}.")
        for i in range(cfg.model.transformer.dec_layers)
    ]


def is_denoising(args: Args, state: State) -> bool:
    """DN-Deformable-DETR rather than DAB-Deformable-DETR: ``modelname`` when given, else the
    ``label_enc`` weights (present even when it was trained without ``use_dn``), else
    ``use_dn``."""
    modelname = arg(args, "modelname")
    if modelname is not None:
        return modelname == "dn_dab_deformable_detr"
    if state:
        return "label_enc.weight" in state
    return bool(arg(args, "use_dn"))


def _transformer(args: Args, state: State, t: TransformerConfig) -> None:
    """Width and levels (``transformer.level_embed``), attention heads and points, depth,
    dropout and activation."""

    def level_embed(dim: int) -> int:
        return int(
            need(state, "transformer.level_embed", "hidden_dim/num_feature_levels").shape[dim]
        )

    t.hidden_dim = int(pick(args, "hidden_dim", lambda: level_embed(1)))
    t.num_feature_levels = int(pick(args, "num_feature_levels", lambda: level_embed(0)))
    if t.num_feature_levels == 2 or not 1 <= t.num_feature_levels <= 5:
        raise ConversionError(
            f"official args: num_feature_levels={t.num_feature_levels} is not "
            "supported (1, 3, 4 or 5; 2 cannot run in the official code)"
        )
    t.nheads, t.enc_n_points, t.dec_n_points = heads_and_points(args, state, t.num_feature_levels)
    transformer_depth(args, state, t)
    t.dropout = float(pick(args, "dropout", lambda: 0.0))
    t.activation = "relu"  # hard-coded by both official builders


def _queries(args: Args, state: State, q: QueryConfig, denoising: bool) -> None:
    """Anchor count (``refpoint_embed``), patterns (``patterns_embed``), random anchor xy."""
    q.num_queries = int(
        pick(
            args,
            "num_queries",
            lambda: need(state, "refpoint_embed.weight", "num_queries").shape[0],
        )
    )
    q.num_patterns = int(
        pick(
            args,
            "num_patterns",
            lambda: (
                int(state["patterns_embed.weight"].shape[0])
                if "patterns_embed.weight" in state
                else 0
            ),
        )
    )
    if denoising and q.num_patterns:
        raise ConversionError(
            "official args: num_patterns > 0 is not supported by "
            "DN-Deformable-DETR (the official forward fails)"
        )
    q.random_refpoints_xy = bool(pick(args, "random_refpoints_xy", lambda: False))


def _denoising(args: Args, dn: DenoisingConfig) -> None:
    """The DN-DETR noise arguments (``scalar``, ``label_noise_scale``, ``box_noise_scale``)."""
    dn.dn_number = int(pick(args, "scalar", lambda: dn.dn_number))
    dn.label_noise_ratio = float(pick(args, "label_noise_scale", lambda: dn.label_noise_ratio))
    dn.box_noise_scale = float(pick(args, "box_noise_scale", lambda: dn.box_noise_scale))


def to_config(args: Args, state: State) -> Config:
    """DAB- / DN-Deformable-DETR arguments (possibly partial) + weights -> detrkit config.

    Values come from ``args`` when present, otherwise from the tensor shapes (width and levels
    from ``transformer.level_embed``, layer counts, FFN width, queries from ``refpoint_embed``,
    patterns from ``patterns_embed``, classes, heads/points from the attention weights).
    """
    if arg(args, "masks"):
        raise ConversionError("official args: masks=True (segmentation) is not supported")
    if arg(args, "two_stage") or "transformer.enc_output.weight" in state:
        raise ConversionError(
            "official args: two_stage=True DAB-/DN-Deformable-DETR cannot run in "
            "the official code (its decoder fails); not supported"
        )
    denoising = is_denoising(args, state)
    cfg = get_preset("dn_deformable_detr_r50" if denoising else "dab_deformable_detr_r50")
    m, q = cfg.model, cfg.model.queries
    m.backbone = backbone_config(args, state)
    m.position = sine_or_learned_position(args, state)
    _transformer(args, state, m.transformer)
    _queries(args, state, q, denoising)
    m.aux_loss = bool(pick(args, "aux_loss", lambda: True))
    rows = int(state["class_embed.0.weight"].shape[0]) if "class_embed.0.weight" in state else None
    m.num_classes = resolve_num_classes(args, rows)
    if denoising:
        _denoising(args, m.denoising)
    # the official post-processing keeps the top 100 (query, class) pairs
    cfg.postprocess.num_select = min(100, q.num_queries * max(q.num_patterns, 1) * m.num_classes)
    apply_training_args(cfg, args)
    return cfg.validate()


def from_official(state: State, cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official state dict -> detrkit keys (and the keys no rule matched); aliases dropped."""
    source = dict(state)
    drop_aliases(source, alias_map(source, alias_prefixes(cfg)), "DAB-Deformable-DETR checkpoint")
    return rename(source, RULES, ignore=[r"\.num_batches_tracked$"])


def to_official(state: State, cfg: Config) -> dict[str, Tensor]:
    """detrkit state dict -> official key names, alias keys included."""
    out, unmatched = rename(state, RULES, reverse=True)
    if unmatched:
        raise ConversionError(f"keys with no official DAB-Deformable-DETR name: {unmatched[:10]}")
    return add_aliases(out, alias_prefixes(cfg))


CONVERTER = FamilyConverter(
    family="dab_deformable_detr",
    to_config=to_config,
    from_official=from_official,
    to_official=to_official,
)
