"""facebookresearch/detr checkpoints (``models.detr.DETR``, detection only).

Official layout -> detrkit layout::

    backbone.0.body.*                              -> backbone.body.*
    backbone.1.{row,col}_embed.*  (learned pos.)   -> position.{row,col}_embed.*
    input_proj.*                                   -> neck.layers.0.0.*
    transformer.encoder.*                          -> transformer.encoder.*
    transformer.decoder.layers.N.multihead_attn.*  -> transformer.decoder.layers.N.cross_attn.*
    transformer.decoder.*                          -> transformer.decoder.*
    query_embed.*                                  -> transformer.queries.query_pos.*
    class_embed.* / bbox_embed.*                   -> transformer.heads.{class,bbox}_embed.0.*
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from detrkit.config import Config, PositionConfig
from detrkit.convert.keymap import (
    BACKBONE_RULES,
    LEARNED_POSITION_RULES,
    SINGLE_LEVEL_NECK_RULES,
    ConversionError,
    KeyRule,
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

__all__ = ["RULES", "to_config", "from_official", "to_official", "CONVERTER"]

RULES: tuple[KeyRule, ...] = (
    BACKBONE_RULES
    + LEARNED_POSITION_RULES
    + SINGLE_LEVEL_NECK_RULES
    + (
        KeyRule(
            "transformer.decoder.layers.{n}.multihead_attn.",
            "transformer.decoder.layers.{n}.cross_attn.",
        ),
        KeyRule("transformer.encoder.", "transformer.encoder."),
        KeyRule("transformer.decoder.", "transformer.decoder."),
        KeyRule("query_embed.", "transformer.queries.query_pos."),
        KeyRule("class_embed.", "transformer.heads.class_embed.0."),
        KeyRule("bbox_embed.", "transformer.heads.bbox_embed.0."),
    )
)


def to_config(args: Args, state: State) -> Config:
    """DETR arguments (possibly partial) + weights -> detrkit config (``detr_r50`` preset base)."""
    if arg(args, "masks"):
        raise ConversionError("official args: masks=True (DETR segmentation) is not supported")
    cfg = get_preset("detr_r50")
    m, t = cfg.model, cfg.model.transformer
    m.backbone = backbone_config(args, state)
    m.position = PositionConfig(kind=position_kind(args, state))

    def query_shape(dim: int) -> Callable[[], int]:
        return lambda: int(need(state, "query_embed.weight", "hidden_dim/num_queries").shape[dim])

    t.hidden_dim = int(pick(args, "hidden_dim", query_shape(1)))
    m.queries.num_queries = int(pick(args, "num_queries", query_shape(0)))
    t.nheads = int(pick(args, "nheads", lambda: assume("nheads", 8)))
    transformer_depth(args, state, t)
    t.dropout = float(pick(args, "dropout", lambda: 0.1))
    t.pre_norm = bool(pick(args, "pre_norm", lambda: "transformer.encoder.norm.weight" in state))
    t.activation = "relu"
    m.aux_loss = bool(pick(args, "aux_loss", lambda: True))
    rows = state["class_embed.weight"].shape[0] - 1 if "class_embed.weight" in state else None
    m.num_classes = resolve_num_classes(args, rows)

    apply_training_args(cfg, args)
    return cfg.validate()


def from_official(state: State, cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official DETR state dict -> detrkit keys (and the keys no rule matched)."""
    return rename(state, RULES, ignore=[r"\.num_batches_tracked$"])


def to_official(state: State, cfg: Config) -> dict[str, Tensor]:
    """detrkit DETR state dict -> official key names (DETR has no alias keys)."""
    out, unmatched = rename(state, RULES, reverse=True)
    if unmatched:
        raise ConversionError(f"keys with no official DETR name: {unmatched[:10]}")
    return out


CONVERTER = FamilyConverter(
    family="detr", to_config=to_config, from_official=from_official, to_official=to_official
)
