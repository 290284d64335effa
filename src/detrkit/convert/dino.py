"""IDEA-Research/DINO checkpoints (``models.dino.dino.DINO``, ``config/DINO/DINO_*.py``).

Official layout -> detrkit layout (``L`` = decoder layers)::

    backbone.0.body.*                         -> backbone.body.*
    backbone.1.{row,col}_embed.* (learned)    -> position.{row,col}_embed.*
    input_proj.{i}.{0,1}.*                    -> neck.layers.{i}.{0,1}.*
    transformer.level_embed / encoder.* / decoder.layers.* / decoder.ref_point_head.* /
    decoder.norm.*                            -> the same names (decoder layers: norm1 and
                                                 norm2 swapped)
    transformer.tgt_embed.* / refpoint_embed.* (two_stage_type "no")
                                              -> transformer.queries.content.* / anchors.*
    transformer.enc_output(_norm).*           -> transformer.queries.enc_output(_norm).*
    transformer.enc_out_class_embed.*         -> transformer.heads.enc_class_embed.*
    transformer.enc_out_bbox_embed.*          -> transformer.heads.enc_bbox_embed.*
    label_enc.*                               -> transformer.denoising.label_enc.*
    class_embed.{i}.* / bbox_embed.{i}.*      -> transformer.heads.class_embed.{i}.* / ...

Alias keys: ``transformer.decoder.class_embed.{i}`` / ``bbox_embed.{i}`` repeat the top-level
heads; with shared decoder heads (``dec_pred_*_embed_share``, the default) every ``{i}`` repeats
``.0``; with ``two_stage_*_embed_share`` the encoder heads repeat ``class_embed.0`` /
``bbox_embed.0``. They are checked, dropped, and written back by :func:`to_official`.

Supported: every ``two_stage_type`` ("standard" = mixed query selection, "no" = learned
anchors), levels 1-5 with any ``return_interm_indices``, shared or separate heads,
``embed_init_tgt`` on or off, ``use_detached_boxes_dec_out``, any query / denoising counts and
label-book size. Refused (a clear error): the experimental options the official configs leave
off (``two_stage_add_query_num``, ``two_stage_pat_embed``, ``two_stage_learn_wh``,
``two_stage_keep_all_tokens``, ``dec_layer_number``, ``decoder_sa_type`` other than ``sa``, a
reordered ``decoder_module_seq``, deformable box attention, channel attention, unicoder layers,
``pre_norm``, ``num_patterns``, ``fix_refpoints_hw``, masks).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from detrkit.config import Config, PositionConfig, QueryConfig
from detrkit.convert.dab_deformable_detr import add_aliases, alias_map
from detrkit.convert.deformable_detr import heads_and_points
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
    position_kind,
    resolve_num_classes,
    transformer_depth,
)
from detrkit.models.backbone import RESNET_CHANNELS
from detrkit.presets import get_preset

__all__ = ["RULES", "alias_prefixes", "to_config", "from_official", "to_official", "CONVERTER"]

RULES: tuple[KeyRule, ...] = (
    BACKBONE_RULES
    + LEARNED_POSITION_RULES
    + MULTI_LEVEL_NECK_RULES
    + DEFORMABLE_DECODER_RULES
    + (
        KeyRule("transformer.level_embed", "transformer.level_embed"),
        KeyRule("transformer.encoder.", "transformer.encoder."),
        KeyRule("transformer.decoder.ref_point_head.", "transformer.decoder.ref_point_head."),
        KeyRule("transformer.decoder.norm.", "transformer.decoder.norm."),
        KeyRule("transformer.tgt_embed.", "transformer.queries.content."),
        KeyRule("transformer.refpoint_embed.", "transformer.queries.anchors."),
        KeyRule("transformer.enc_output.", "transformer.queries.enc_output."),
        KeyRule("transformer.enc_output_norm.", "transformer.queries.enc_output_norm."),
        KeyRule("transformer.enc_out_class_embed.", "transformer.heads.enc_class_embed."),
        KeyRule("transformer.enc_out_bbox_embed.", "transformer.heads.enc_bbox_embed."),
        KeyRule("label_enc.", "transformer.denoising.label_enc."),
    )
    + per_layer_head_rules()
)

# option -> value the official configs use; anything else builds a model detrkit does not have
_UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("two_stage_add_query_num", 0),
    ("two_stage_pat_embed", 0),
    ("two_stage_learn_wh", False),
    ("two_stage_keep_all_tokens", False),
    ("dec_layer_number", None),
    ("decoder_sa_type", "sa"),
    ("decoder_module_seq", ["sa", "ca", "ffn"]),
    ("use_deformable_box_attn", False),
    ("add_channel_attention", False),
    ("unic_layers", 0),
    ("pre_norm", False),
    ("num_patterns", 0),
    ("fix_refpoints_hw", -1),
    ("query_dim", 4),
    ("masks", False),
)


def alias_prefixes(cfg: Config) -> list[tuple[str, str]]:
    """(alias prefix, canonical prefix) pairs of the heads of the model described by ``cfg``."""
    h, layers = cfg.model.heads, cfg.model.transformer.dec_layers
    out = []
    for head, shared in (
        ("class_embed", h.share_decoder_class),
        ("bbox_embed", h.share_decoder_box),
    ):
        for i in range(layers):
            canonical = f"{head}.{0 if shared else i}."
            if i > 0 and shared:
                out.append((f"{head}.{i}.", canonical))
            out.append((f"transformer.decoder.{head}.{i}.", canonical))
    if h.share_encoder_class:
        out.append(("transformer.enc_out_class_embed.", "class_embed.0."))
    if h.share_encoder_box:
        out.append(("transformer.enc_out_bbox_embed.", "bbox_embed.0."))
    return out


def _same(state: State, a: str, b: str) -> bool:
    """Keys ``a`` and ``b`` both exist and hold identical tensors."""
    return (
        a in state
        and b in state
        and state[a].shape == state[b].shape
        and bool((state[a] == state[b]).all())
    )


def _shared(state: State, head: str, layers: int) -> bool:
    """Decoder head sharing from the weights: every layer's head equals layer 0's. Without
    weights of the head, the upstream default (``dec_pred_*_embed_share=True``): shared."""
    key = f"{head}.{{}}.{'weight' if head == 'class_embed' else 'layers.0.weight'}"
    if key.format(0) not in state:
        return True
    return layers < 2 or all(_same(state, key.format(0), key.format(i)) for i in range(1, layers))


def _position(args: Args, state: State) -> PositionConfig:
    if position_kind(args, state) == "learned":
        return PositionConfig(kind="learned")
    return PositionConfig(
        kind="sine",
        offset=0.0,
        temperature_h=float(pick(args, "pe_temperatureH", lambda: 20)),
        temperature_w=float(pick(args, "pe_temperatureW", lambda: 20)),
    )


def _backbone_levels(args: Args, state: State, backbone: str, num_levels: int) -> list[int] | None:
    """``model.backbone.levels`` from ``return_interm_indices`` (0 = C2) or, without it, from
    the input widths of the 1x1 ``input_proj`` convolutions; ``None`` for the default (C5 for
    one level, C3-C5 otherwise)."""
    indices = arg(args, "return_interm_indices")
    if indices is not None:
        levels = [int(i) + 1 for i in indices]
    else:
        stage_of = {c: i + 1 for i, c in enumerate(RESNET_CHANNELS[backbone])}
        levels = []
        for i in range(num_levels):
            weight = state.get(f"input_proj.{i}.0.weight")
            if weight is None or weight.shape[-1] != 1:
                break  # the strided extra levels follow the backbone levels
            if int(weight.shape[1]) not in stage_of:
                raise ConversionError(
                    f"input_proj.{i}.0.weight: {weight.shape[1]} input "
                    f"channels match no stage of {backbone}"
                )
            levels.append(stage_of[int(weight.shape[1])])
        if not levels:
            return None
    default = [4] if num_levels == 1 else [2, 3, 4]
    return None if levels == default else levels


def _check_supported(args: Args) -> None:
    for key, expected in _UNSUPPORTED:
        value = arg(args, key)
        if (
            value is not None
            and value != expected
            and not (key == "decoder_module_seq" and list(value) == expected)
        ):
            raise ConversionError(
                f"official args: {key}={value!r} is not supported (only {expected!r})"
            )
    if arg(args, "decoder_layer_noise"):
        warnings.warn(
            "official args: decoder_layer_noise (training-time anchor jitter) is not "
            "reproduced; inference is unaffected",
            stacklevel=4,
        )
    activation = arg(args, "transformer_activation")
    if activation is not None and activation not in ("relu", "gelu", "prelu"):
        raise ConversionError(
            f"official args: transformer_activation '{activation}' is not "
            "supported (relu, gelu, prelu)"
        )


def _transformer(args: Args, state: State, cfg: Config) -> None:
    """Width, levels (and the backbone levels feeding them), attention heads and points,
    depth, dropout and activation."""
    m, t = cfg.model, cfg.model.transformer

    def level_embed(dim: int, what: str) -> int:
        return int(need(state, "transformer.level_embed", what).shape[dim])

    t.hidden_dim = int(pick(args, "hidden_dim", lambda: level_embed(1, "hidden_dim")))
    t.num_feature_levels = int(
        pick(args, "num_feature_levels", lambda: level_embed(0, "num_feature_levels"))
    )
    m.backbone.levels = _backbone_levels(args, state, m.backbone.name, t.num_feature_levels)
    t.nheads, t.enc_n_points, t.dec_n_points = heads_and_points(args, state, t.num_feature_levels)
    transformer_depth(args, state, t)
    t.dropout = float(pick(args, "dropout", lambda: 0.0))
    t.activation = pick(args, "transformer_activation", lambda: "relu")


def _queries(args: Args, state: State, q: QueryConfig) -> None:
    """Query selection (``two_stage_type``), content, box update and the query count."""
    two_stage = pick(
        args,
        "two_stage_type",
        lambda: "standard" if "transformer.enc_output.weight" in state else "no",
    )
    if two_stage not in ("standard", "no"):
        raise ConversionError(
            f"official args: two_stage_type '{two_stage}' is not supported (standard or no)"
        )
    q.kind = "mixed" if two_stage == "standard" else "anchors"
    # learned anchors always come with learned content; selected ones may take the features
    learned = two_stage == "no" or bool(
        pick(args, "embed_init_tgt", lambda: "transformer.tgt_embed.weight" in state)
    )
    q.content = "learned" if learned else "encoder"
    q.box_update = (
        "refine"
        if pick(args, "use_detached_boxes_dec_out", lambda: False)
        else "look_forward_twice"
    )
    # rank every token by score, as the official code
    q.select_valid_proposals = q.kind != "mixed"
    q.random_refpoints_xy = bool(pick(args, "random_refpoints_xy", lambda: False))
    query_key = "transformer.tgt_embed.weight" if learned else None
    if q.kind == "anchors":
        query_key = "transformer.refpoint_embed.weight"
    q.num_queries = int(
        pick(
            args,
            "num_queries",
            lambda: need(state, query_key, "num_queries").shape[0] if query_key else 900,
        )
    )
    if not learned and arg(args, "num_queries") is None:
        warnings.warn(
            "official args: 'num_queries' cannot be inferred without tgt_embed; assuming 900",
            stacklevel=4,
        )


def _heads(args: Args, state: State, cfg: Config) -> None:
    """Which heads are shared: between the decoder layers, and (mixed query selection) between
    the encoder proposals and the first decoder layer."""
    h, layers = cfg.model.heads, cfg.model.transformer.dec_layers
    h.share_decoder_class = bool(
        pick(args, "dec_pred_class_embed_share", lambda: _shared(state, "class_embed", layers))
    )
    h.share_decoder_box = bool(
        pick(args, "dec_pred_bbox_embed_share", lambda: _shared(state, "bbox_embed", layers))
    )
    if cfg.model.queries.kind != "mixed":
        h.share_encoder_class = h.share_encoder_box = False
        return
    class_key, box_key = "class_embed.0.weight", "bbox_embed.0.layers.0.weight"
    enc_class_key = "transformer.enc_out_class_embed.weight"
    enc_box_key = "transformer.enc_out_bbox_embed.layers.0.weight"
    h.share_encoder_class = bool(
        pick(
            args,
            "two_stage_class_embed_share",
            lambda: enc_class_key in state and _same(state, enc_class_key, class_key),
        )
    )
    h.share_encoder_box = bool(
        pick(
            args,
            "two_stage_bbox_embed_share",
            lambda: enc_box_key in state and _same(state, enc_box_key, box_key),
        )
    )


def _denoising(args: Args, state: State, cfg: Config) -> None:
    """Contrastive denoising: query count, noise and the label book (``label_enc`` rows)."""
    m = cfg.model
    dn = m.denoising
    if arg(args, "use_dn") is False:
        warnings.warn(
            "official args: use_dn=False; the label embedding is kept and training "
            "with detrkit uses contrastive denoising (set model.denoising.kind=none "
            "after loading to switch it off)",
            stacklevel=4,
        )
    dn.dn_number = int(pick(args, "dn_number", lambda: dn.dn_number))
    dn.label_noise_ratio = float(pick(args, "dn_label_noise_ratio", lambda: dn.label_noise_ratio))
    dn.box_noise_scale = float(pick(args, "dn_box_noise_scale", lambda: dn.box_noise_scale))
    book = pick(
        args,
        "dn_labelbook_size",
        lambda: (
            int(state["label_enc.weight"].shape[0]) - 1 if "label_enc.weight" in state else None
        ),
    )
    dn.labelbook_size = None if book is None or int(book) == m.num_classes else int(book)


def _postprocess(args: Args, cfg: Config) -> None:
    """The top-k of the official post-processing (its optional NMS is not reproduced)."""
    if (arg(args, "nms_iou_threshold") or -1) > 0:
        warnings.warn(
            "official args: nms_iou_threshold > 0 (post-processing NMS) is not "
            "reproduced; detections are the plain top-k",
            stacklevel=4,
        )
    num_select = int(pick(args, "num_select", lambda: 300))
    cfg.postprocess.num_select = min(
        num_select, cfg.model.queries.num_queries * cfg.model.num_classes
    )


def to_config(args: Args, state: State) -> Config:
    """DINO arguments (possibly partial) + weights -> detrkit config.

    Values come from ``args`` when present, otherwise from the tensor shapes (width and levels
    from ``transformer.level_embed``, the backbone levels from ``input_proj``, layer counts,
    FFN width, query count from ``tgt_embed`` / ``refpoint_embed``, head sharing from equal
    head weights, the label book from ``label_enc``).
    """
    _check_supported(args)
    cfg = get_preset("dino_4scale_r50")
    m = cfg.model
    m.backbone = backbone_config(args, state)
    m.position = _position(args, state)
    _transformer(args, state, cfg)
    _queries(args, state, m.queries)
    _heads(args, state, cfg)
    m.aux_loss = bool(pick(args, "aux_loss", lambda: True))
    rows = int(state["class_embed.0.weight"].shape[0]) if "class_embed.0.weight" in state else None
    m.num_classes = resolve_num_classes(args, rows)
    _denoising(args, state, cfg)
    _postprocess(args, cfg)
    apply_training_args(cfg, args)
    return cfg.validate()


def from_official(state: State, cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official DINO state dict -> detrkit keys (and the keys no rule matched); aliases
    dropped after checking they repeat their canonical tensor."""
    source = dict(state)
    drop_aliases(source, alias_map(source, alias_prefixes(cfg)), "DINO checkpoint")
    return rename(source, RULES, ignore=[r"\.num_batches_tracked$"])


def to_official(state: State, cfg: Config) -> dict[str, Tensor]:
    """detrkit DINO state dict -> official key names, alias keys included."""
    out, unmatched = rename(state, RULES, reverse=True)
    if unmatched:
        raise ConversionError(f"keys with no official DINO name: {unmatched[:10]}")
    return add_aliases(out, alias_prefixes(cfg))


CONVERTER = FamilyConverter(
    family="dino", to_config=to_config, from_official=from_official, to_official=to_official
)
