"""IDEA-Research/DAB-DETR ``dab_detr`` and IDEA-Research/DN-DETR ``dn_dab_detr`` checkpoints
(the single-scale models, ``models.DAB_DETR.DABDETR`` / ``models.DN_DAB_DETR.DABDETR``).

Official layout -> detrkit layout::

    backbone.0.body.*                         -> backbone.body.*
    backbone.1.{row,col}_embed.* (learned)    -> position.{row,col}_embed.*
    input_proj.*                              -> neck.layers.0.0.*
    transformer.encoder.* / decoder.*         -> the same names, except
    transformer.decoder.layers.N.sa_* / ca_*  -> transformer.decoder.layers.N.self_attn.* /
                                                 cross_attn.*
    transformer.patterns.* / refpoint_embed.* -> transformer.queries.patterns.* / anchors.*
    label_enc.* (DN-DETR)                     -> transformer.denoising.label_enc.*
    class_embed.* / bbox_embed.*              -> transformer.heads.{class,bbox}_embed.0.*

Alias keys: the shared box head is registered twice, ``transformer.decoder.bbox_embed.*`` repeats
``bbox_embed.*``; it is checked and dropped, and :func:`to_official` writes it back.

Both families share one converter: DN-DETR is recognised by ``modelname`` in the arguments or
by the ``label_enc`` weights (``use_dn`` decides only without either: the DN-DETR model has the
label embedding even when trained without denoising).
"""

from __future__ import annotations

from torch import Tensor

from detrkit.config import Config, DenoisingConfig, PositionConfig
from detrkit.convert.keymap import (
    BACKBONE_RULES,
    LEARNED_POSITION_RULES,
    SINGLE_LEVEL_NECK_RULES,
    ConversionError,
    KeyRule,
    drop_aliases,
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
from detrkit.models.attention import CROSS_PROJECTIONS, SELF_PROJECTIONS
from detrkit.presets import get_preset

__all__ = ["RULES", "aliases", "to_config", "from_official", "to_official", "CONVERTER"]

_CONDITIONAL = tuple(
    KeyRule(
        f"transformer.decoder.layers.{{n}}.{prefix}_{name}.",
        f"transformer.decoder.layers.{{n}}.{attn}.{name}.",
    )
    for prefix, attn, names in (
        ("sa", "self_attn", SELF_PROJECTIONS),
        ("ca", "cross_attn", CROSS_PROJECTIONS),
    )
    for name in names
)
RULES: tuple[KeyRule, ...] = (
    BACKBONE_RULES
    + LEARNED_POSITION_RULES
    + SINGLE_LEVEL_NECK_RULES
    + _CONDITIONAL
    + (
        KeyRule("transformer.encoder.", "transformer.encoder."),
        KeyRule("transformer.decoder.", "transformer.decoder."),
        KeyRule("transformer.patterns.", "transformer.queries.patterns."),
        KeyRule("refpoint_embed.", "transformer.queries.anchors."),
        KeyRule("label_enc.", "transformer.denoising.label_enc."),
        KeyRule("class_embed.", "transformer.heads.class_embed.0."),
        KeyRule("bbox_embed.", "transformer.heads.bbox_embed.0."),
    )
)
_ALIAS_PREFIX, _CANONICAL_PREFIX = "transformer.decoder.bbox_embed.", "bbox_embed."


def aliases(state: State) -> dict[str, str]:
    """Alias key -> canonical key (official names) for the tensors of ``state``."""
    return {
        k: _CANONICAL_PREFIX + k[len(_ALIAS_PREFIX) :] for k in state if k.startswith(_ALIAS_PREFIX)
    }


def _position(args: Args, state: State) -> PositionConfig:
    if position_kind(args, state) == "learned":
        return PositionConfig(kind="learned")
    return PositionConfig(
        kind="sine",
        temperature_h=float(pick(args, "pe_temperatureH", lambda: 20)),
        temperature_w=float(pick(args, "pe_temperatureW", lambda: 20)),
        normalize=True,
        offset=0.0,
    )


def _activation(args: Args, state: State) -> str:
    value = arg(args, "transformer_activation")
    if value is None:
        if (
            "transformer.encoder.layers.0.activation.weight" in state
            or "transformer.decoder.layers.0.activation.weight" in state
        ):
            return "prelu"
        return str(assume("transformer_activation", "relu"))
    if value not in ("relu", "gelu", "prelu"):
        raise ConversionError(
            f"official args: transformer_activation '{value}' is not supported (relu, gelu, prelu)"
        )
    return str(value)


def _uses_dn(args: Args, state: State) -> bool:
    """DN-DETR rather than DAB-DETR: ``modelname`` when given, else the ``label_enc`` weights,
    else ``use_dn``. The DN-DETR model always has the label embedding and starts its matching
    queries from it; ``use_dn`` only says whether it was trained with denoising, so a
    ``dn_dab_detr`` checkpoint with ``use_dn=False`` is still the DN model."""
    if arg(args, "modelname") is not None:
        return args["modelname"] == "dn_dab_detr"
    if state:
        return "label_enc.weight" in state
    return bool(arg(args, "use_dn"))


def _check_supported(args: Args) -> None:
    """Refuse the upstream options detrkit has no model for."""
    if arg(args, "masks"):
        raise ConversionError("official args: masks=True (segmentation) is not supported")
    if arg(args, "pre_norm"):
        raise ConversionError("official args: pre_norm=True is not supported for DAB-DETR")
    if arg(args, "contrastive"):
        raise ConversionError("official args: contrastive=True (DN-DETR) is not supported")


def _anchor_options(args: Args, state: State, cfg: Config) -> None:
    """The DAB decoder's options: post-norm, width/height-modulated cross-attention (with
    ``ref_anchor_head`` weights), anchor patterns (``transformer.patterns``), random xy."""
    t, q = cfg.model.transformer, cfg.model.queries
    t.pre_norm = False
    t.modulate_hw_attn = not state or "transformer.decoder.ref_anchor_head.layers.0.weight" in state
    q.num_patterns = int(
        pick(
            args,
            "num_patterns",
            lambda: (
                int(state["transformer.patterns.weight"].shape[0])
                if "transformer.patterns.weight" in state
                else 0
            ),
        )
    )
    q.random_refpoints_xy = bool(pick(args, "random_refpoints_xy", lambda: False))


def _denoising(args: Args, cfg: Config) -> None:
    """DN-DETR: denoising groups (``scalar``) and noise; the matching queries start from the
    label embedding."""
    cfg.model.denoising = DenoisingConfig(
        kind="dn",
        dn_number=int(pick(args, "scalar", lambda: 5)),
        label_noise_ratio=float(pick(args, "label_noise_scale", lambda: 0.2)),
        box_noise_scale=float(pick(args, "box_noise_scale", lambda: 0.4)),
        content_indicator=True,
    )  # DN-DETR: 255-wide label embedding + indicator
    cfg.model.queries.content = "label"  # matching queries start from the "unknown" label


def to_config(args: Args, state: State) -> Config:
    """DAB-DETR / DN-DETR arguments (possibly partial) + weights -> detrkit config.

    Values come from ``args`` when present, else from the tensor shapes (width and queries
    from ``refpoint_embed`` / ``class_embed``, layers by counting, FFN width, patterns,
    classes, PReLU from its weight, width/height modulation from ``ref_anchor_head``).
    ``nheads`` cannot be inferred (8 is assumed with a warning).
    """
    _check_supported(args)
    dn = _uses_dn(args, state)
    cfg = get_preset("dn_detr_r50" if dn else "dab_detr_r50")
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    m.backbone = backbone_config(args, state)
    m.position = _position(args, state)
    t.hidden_dim = int(
        pick(args, "hidden_dim", lambda: need(state, "class_embed.weight", "hidden_dim").shape[1])
    )
    q.num_queries = int(
        pick(
            args,
            "num_queries",
            lambda: need(state, "refpoint_embed.weight", "num_queries").shape[0],
        )
    )
    t.nheads = int(pick(args, "nheads", lambda: assume("nheads", 8)))
    transformer_depth(args, state, t)
    t.dropout = float(pick(args, "dropout", lambda: 0.0))
    t.activation = _activation(args, state)  # type: ignore[assignment]
    _anchor_options(args, state, cfg)
    m.aux_loss = bool(pick(args, "aux_loss", lambda: True))
    rows = int(state["class_embed.weight"].shape[0]) if "class_embed.weight" in state else None
    m.num_classes = resolve_num_classes(args, rows)
    if dn:
        _denoising(args, cfg)
    num_select = int(pick(args, "num_select", lambda: 300))
    cfg.postprocess.num_select = min(num_select, q.num_queries * m.num_classes)

    apply_training_args(cfg, args)
    return cfg.validate()


def from_official(state: State, cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official DAB-DETR / DN-DETR state dict -> detrkit keys (and the keys no rule matched).
    The decoder's alias of the box head is checked against ``bbox_embed`` and dropped."""
    source = dict(state)
    drop_aliases(source, aliases(source), "DAB-DETR checkpoint")
    return rename(source, RULES, ignore=[r"\.num_batches_tracked$"])


def to_official(state: State, cfg: Config) -> dict[str, Tensor]:
    """detrkit DAB-DETR / DN-DETR state dict -> official key names, alias keys included."""
    out, unmatched = rename(state, RULES, reverse=True)
    if unmatched:
        raise ConversionError(f"keys with no official DAB-DETR name: {unmatched[:10]}")
    for key in [k for k in out if k.startswith(_CANONICAL_PREFIX)]:
        out[_ALIAS_PREFIX + key[len(_CANONICAL_PREFIX) :]] = out[key]
    return out


CONVERTER = FamilyConverter(
    family="dab_detr", to_config=to_config, from_official=from_official, to_official=to_official
)
