"""fundamentalvision/Deformable-DETR checkpoints (``models.deformable_detr.DeformableDETR``).

Official layout -> detrkit layout (``L`` = decoder layers)::

    backbone.0.body.*                         -> backbone.body.*
    backbone.1.{row,col}_embed.* (learned)    -> position.{row,col}_embed.*
    input_proj.{i}.{0,1}.*                    -> neck.layers.{i}.{0,1}.*
    transformer.level_embed / encoder.* / decoder.layers.*
                                              -> the same names (decoder layers: norm1 and
                                                 norm2 swapped)
    transformer.reference_points.*            -> transformer.queries.reference_points.*
    transformer.{enc_output,enc_output_norm,pos_trans,pos_trans_norm}.*
                                              -> transformer.queries.*
    query_embed.weight [Q, 2d]                -> transformer.queries.query_pos.weight [Q, :d]
                                                 and transformer.queries.content.weight [Q, d:]
    class_embed.{i}.* / bbox_embed.{i}.*      -> transformer.heads.class_embed.{i}.* / ...
    class_embed.{L}.* / bbox_embed.{L}.*      -> transformer.heads.enc_class_embed.* / ...
                                                 (two-stage with refinement: the encoder heads)

Alias keys (the official model registers one module under several names; a ``.pth`` holds
every name): without refinement ``class_embed.{1..}`` / ``bbox_embed.{1..}`` repeat ``.0``;
with refinement ``transformer.decoder.bbox_embed.{i}`` is ``bbox_embed.{i}``; with two-stage
``transformer.decoder.class_embed.{i}`` is ``class_embed.{i}``. They are checked to hold the
same values and dropped; :func:`to_official` writes them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from detrkit.config import Config, PositionConfig, TransformerConfig
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
    assume,
    backbone_config,
    need,
    pick,
    position_kind,
    resolve_num_classes,
    transformer_depth,
)
from detrkit.presets import get_preset

__all__ = [
    "rules",
    "aliases",
    "sine_or_learned_position",
    "heads_and_points",
    "to_config",
    "from_official",
    "to_official",
    "CONVERTER",
]

_TWO_STAGE_PARTS = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
# the official [Q, 2d] query embedding, split into detrkit's positional and content halves
_JOINT_QUERY_EMBED = "transformer.queries.query_embed."
_POS, _CONTENT = "transformer.queries.query_pos.weight", "transformer.queries.content.weight"


def _layout(cfg: Config) -> tuple[int, bool, bool]:
    """``(decoder layers, refine, two_stage)`` of a Deformable DETR config."""
    q = cfg.model.queries
    return cfg.model.transformer.dec_layers, q.box_update != "none", q.kind == "two_stage"


def rules(cfg: Config) -> tuple[KeyRule, ...]:
    """Official <-> detrkit key rules of the model described by ``cfg`` (aliases excluded)."""
    dec_layers, refine, two_stage = _layout(cfg)
    out = (
        BACKBONE_RULES
        + LEARNED_POSITION_RULES
        + MULTI_LEVEL_NECK_RULES
        + DEFORMABLE_DECODER_RULES
        + (
            KeyRule("transformer.level_embed", "transformer.level_embed"),
            KeyRule("transformer.encoder.", "transformer.encoder."),
            KeyRule("transformer.reference_points.", "transformer.queries.reference_points."),
            KeyRule("query_embed.", _JOINT_QUERY_EMBED),
        )
    )
    out += tuple(
        KeyRule(f"transformer.{p}.", f"transformer.queries.{p}.") for p in _TWO_STAGE_PARTS
    )
    if two_stage and refine:
        out += (
            KeyRule(f"class_embed.{dec_layers}.", "transformer.heads.enc_class_embed."),
            KeyRule(f"bbox_embed.{dec_layers}.", "transformer.heads.enc_bbox_embed."),
        )
    return out + per_layer_head_rules()


def aliases(cfg: Config, state: State) -> dict[str, str]:
    """Alias key -> canonical key (official names) for the tensors of ``state``."""
    dec_layers, refine, two_stage = _layout(cfg)
    num_pred = dec_layers + 1 if two_stage else dec_layers
    prefixes: list[tuple[str, str]] = []  # (alias prefix, canonical prefix)
    for head in ("class_embed", "bbox_embed"):
        for i in range(num_pred):
            canonical = f"{head}.{i if refine else 0}."
            if i > 0 and not refine:
                prefixes.append((f"{head}.{i}.", canonical))
            if (head == "bbox_embed" and refine) or (head == "class_embed" and two_stage):
                prefixes.append((f"transformer.decoder.{head}.{i}.", canonical))
    out: dict[str, str] = {}
    for key in state:
        for alias, canonical in prefixes:
            if key.startswith(alias):
                out[key] = canonical + key[len(alias) :]
                break
    return out


def sine_or_learned_position(args: Args, state: State) -> PositionConfig:
    """The Deformable DETR position encoding (sine with the 0.5 offset, or learned)."""
    if position_kind(args, state) == "learned":
        return PositionConfig(kind="learned")
    return PositionConfig(kind="sine", offset=0.5)


def _refine(state: State) -> bool:
    """Box refinement from the weights: the decoder's alias of the box heads, else distinct
    per-layer heads."""
    if any(k.startswith("transformer.decoder.bbox_embed.") for k in state):
        return True
    key = "bbox_embed.{}.layers.0.weight"
    if key.format(0) in state and key.format(1) in state:
        return not bool((state[key.format(0)] == state[key.format(1)]).all())
    return False


def heads_and_points(args: Args, state: State, levels: int) -> tuple[int, int, int]:
    """``(nheads, enc_n_points, dec_n_points)`` from the args; the attention-weight shapes
    (``heads * levels * points`` rows) give whichever of them is missing."""
    nheads, enc_points, dec_points = (
        arg(args, k) for k in ("nheads", "enc_n_points", "dec_n_points")
    )

    def rows(part: str) -> int | None:
        key = (
            f"transformer.{part}.layers.0.{'self' if part == 'encoder' else 'cross'}_attn."
            "attention_weights.weight"
        )
        return int(state[key].shape[0]) if key in state else None

    enc_rows, dec_rows = rows("encoder"), rows("decoder")
    if nheads is None:
        if enc_points is not None and enc_rows is not None:
            nheads = enc_rows // (levels * int(enc_points))
        elif dec_points is not None and dec_rows is not None:
            nheads = dec_rows // (levels * int(dec_points))
        else:
            nheads = assume("nheads", 8)

    def points(given: Any, found: int | None, name: str) -> int:
        if given is not None:
            return int(given)
        if found is None:
            return int(assume(name, 4))
        if found % (levels * int(nheads)) != 0:
            raise ConversionError(
                f"official args: {name} cannot be inferred: {found} attention "
                f"weights are not a multiple of nheads*levels="
                f"{int(nheads) * levels}; pass nheads and {name}"
            )
        return found // (levels * int(nheads))

    return (
        int(nheads),
        points(enc_points, enc_rows, "enc_n_points"),
        points(dec_points, dec_rows, "dec_n_points"),
    )


def _transformer(args: Args, state: State, t: TransformerConfig) -> None:
    """Width and levels (``transformer.level_embed``), attention heads and points, depth,
    dropout and activation."""

    def level_embed(dim: int) -> Callable[[], int]:
        return lambda: int(
            need(state, "transformer.level_embed", "hidden_dim/num_feature_levels").shape[dim]
        )

    t.hidden_dim = int(pick(args, "hidden_dim", level_embed(1)))
    t.num_feature_levels = int(pick(args, "num_feature_levels", level_embed(0)))
    if t.num_feature_levels == 2:
        raise ConversionError(
            "official args: num_feature_levels=2 builds but cannot run in the "
            "official code (three backbone projections, two level "
            "embeddings); such a checkpoint cannot be converted"
        )
    if not 1 <= t.num_feature_levels <= 5:
        raise ConversionError(
            f"official args: num_feature_levels={t.num_feature_levels} is not "
            "supported (1, 3, 4 or 5)"
        )
    t.nheads, t.enc_n_points, t.dec_n_points = heads_and_points(args, state, t.num_feature_levels)
    transformer_depth(args, state, t)
    t.dropout = float(pick(args, "dropout", lambda: 0.1))
    t.activation = "relu"  # hard-coded by the official builder


def _query_layout(cfg: Config, two_stage: bool, refine: bool) -> None:
    """Queries and head sharing of the two official switches ``two_stage`` and
    ``with_box_refine``."""
    q, h = cfg.model.queries, cfg.model.heads
    q.kind = "two_stage" if two_stage else "reference_points"
    q.content = "proposal" if two_stage else "learned"
    q.box_update = "refine" if refine else "none"
    # one head per layer with refinement; one (also for the proposals) without
    h.share_decoder_class = h.share_decoder_box = not refine
    h.share_encoder_class = h.share_encoder_box = two_stage and not refine
    # two-stage: rank every token by score, as the official code
    q.select_valid_proposals = not two_stage


def to_config(args: Args, state: State) -> Config:
    """Deformable DETR arguments (possibly partial) + weights -> detrkit config.

    Every value comes from ``args`` when present, otherwise from the tensor shapes (levels and
    width from ``transformer.level_embed``, layers by counting, FFN width, queries, classes,
    heads/points from the attention-weight shapes, refinement and two-stage from the key set).
    """
    if arg(args, "masks"):
        raise ConversionError("official args: masks=True (segmentation) is not supported")
    cfg = get_preset("deformable_detr_r50")
    m, q = cfg.model, cfg.model.queries
    m.backbone = backbone_config(args, state)
    m.position = sine_or_learned_position(args, state)
    _transformer(args, state, m.transformer)

    two_stage = bool(pick(args, "two_stage", lambda: "transformer.enc_output.weight" in state))
    refine = bool(pick(args, "with_box_refine", lambda: _refine(state)))
    _query_layout(cfg, two_stage, refine)
    if two_stage:
        q.num_queries = int(pick(args, "num_queries", lambda: assume("num_queries", 300)))
    else:
        q.num_queries = int(
            pick(
                args,
                "num_queries",
                lambda: need(state, "query_embed.weight", "num_queries").shape[0],
            )
        )
    m.aux_loss = bool(pick(args, "aux_loss", lambda: True))
    rows = int(state["class_embed.0.weight"].shape[0]) if "class_embed.0.weight" in state else None
    m.num_classes = resolve_num_classes(args, rows)
    # the official post-processing keeps the top 100 (query, class) pairs
    cfg.postprocess.num_select = min(100, q.num_queries * m.num_classes)

    apply_training_args(cfg, args)
    return cfg.validate()


def from_official(state: State, cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official Deformable DETR state dict -> detrkit keys (and the keys no rule matched).

    Alias keys are checked against their canonical key and dropped.
    """
    source = dict(state)
    drop_aliases(source, aliases(cfg, source), "Deformable DETR checkpoint")
    out, unmatched = rename(source, rules(cfg), ignore=[r"\.num_batches_tracked$"])
    joint = out.pop(_JOINT_QUERY_EMBED + "weight", None)
    if joint is not None:
        half = joint.shape[1] // 2
        out[_POS], out[_CONTENT] = joint[:, :half], joint[:, half:]
    return out, unmatched


def to_official(state: State, cfg: Config) -> dict[str, Tensor]:
    """detrkit Deformable DETR state dict -> official key names, alias keys included."""
    state = dict(state)
    if _POS in state and _CONTENT in state:
        state[_JOINT_QUERY_EMBED + "weight"] = torch.cat([state.pop(_POS), state.pop(_CONTENT)], 1)
    out, unmatched = rename(state, rules(cfg), reverse=True)
    if unmatched:
        raise ConversionError(f"keys with no official Deformable DETR name: {unmatched[:10]}")
    dec_layers, refine, two_stage = _layout(cfg)
    num_pred = dec_layers + 1 if two_stage else dec_layers
    for head in ("class_embed", "bbox_embed"):
        canon = {k: v for k, v in out.items() if k.startswith(f"{head}.")}
        for key, value in canon.items():
            index, rest = key[len(head) + 1 :].split(".", 1)
            targets = [f"{head}.{i}.{rest}" for i in range(1, num_pred)] if not refine else []
            if (head == "bbox_embed" and refine) or (head == "class_embed" and two_stage):
                indices = range(num_pred) if not refine else [int(index)]
                targets += [f"transformer.decoder.{head}.{i}.{rest}" for i in indices]
            for target in targets:
                out[target] = value
    return out


CONVERTER = FamilyConverter(
    family="deformable_detr",
    to_config=to_config,
    from_official=from_official,
    to_official=to_official,
)
