"""Cross-field rules of the config tree.

Model rules come in two groups. :func:`_check_sizes` checks counts and widths.
:data:`MODEL_RULES` lists every combination of switches that would build a model in which one
switch does nothing (or cannot work): each rule names both fields and says why. Every other
combination builds, and every switch in it changes the model (``tests/config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from detrkit.config.data_rules import check_data
from detrkit.config.errors import ConfigError, require
from detrkit.config.model import ModelConfig

if TYPE_CHECKING:
    from detrkit.config.schema import Config, TrainConfig

__all__ = [
    "ModelRule",
    "MODEL_RULES",
    "validate_model",
    "fit_to_classes",
    "validate_config",
    "uses_proposals",
    "has_box_queries",
]

PROPOSAL_KINDS = ("two_stage", "mixed")
BOX_QUERY_KINDS = ("anchors", "mixed")


def uses_proposals(m: ModelConfig) -> bool:
    """Queries start from encoder proposals (``two_stage`` / ``mixed``)."""
    return m.queries.kind in PROPOSAL_KINDS


def has_box_queries(m: ModelConfig) -> bool:
    """Positional queries are embedded from each query's current anchor box every layer."""
    return m.queries.kind in BOX_QUERY_KINDS


@dataclass(frozen=True)
class ModelRule:
    """``key`` may not be set as it is when ``broken(model)``; ``other`` is the field that
    makes it so, ``why`` the reason."""

    key: str
    other: str
    broken: Callable[[ModelConfig], bool]
    why: str


def _kind(m: ModelConfig) -> str:
    return m.queries.kind


MODEL_RULES: tuple[ModelRule, ...] = (
    ModelRule(
        "model.transformer.conditional_attention",
        "model.transformer.attention",
        lambda m: m.transformer.conditional_attention and m.transformer.attention == "deformable",
        "conditional attention is a kind of global attention; deformable cross-attention "
        "samples around the reference instead",
    ),
    ModelRule(
        "model.transformer.conditional_attention",
        "model.queries.kind",
        lambda m: m.transformer.conditional_attention and _kind(m) == "learned",
        "conditional cross-attention embeds each query's reference; 'learned' queries have none",
    ),
    ModelRule(
        "model.queries.kind",
        "model.transformer.attention",
        lambda m: _kind(m) == "learned" and m.transformer.attention == "deformable",
        "deformable cross-attention samples around each query's reference; 'learned' "
        "queries have none (use reference_points)",
    ),
    ModelRule(
        "model.transformer.modulate_hw_attn",
        "model.transformer.conditional_attention",
        lambda m: m.transformer.modulate_hw_attn and not m.transformer.conditional_attention,
        "it modulates the positional query of conditional cross-attention",
    ),
    ModelRule(
        "model.transformer.modulate_hw_attn",
        "model.queries.kind",
        lambda m: m.transformer.modulate_hw_attn and _kind(m) == "reference_points",
        "it needs anchor boxes from the first layer; 2-D reference points have no size",
    ),
    ModelRule(
        "model.transformer.msda_backend",
        "model.transformer.attention",
        lambda m: m.transformer.msda_backend != "auto" and m.transformer.attention == "global",
        "only deformable attention has a backend to choose",
    ),
    ModelRule(
        "model.queries.content",
        "model.denoising.kind",
        lambda m: m.queries.content == "label" and m.denoising.kind == "none",
        "'label' is the 'unknown' row of the denoising label embedding",
    ),
    ModelRule(
        "model.queries.content",
        "model.queries.kind",
        lambda m: m.queries.content in ("encoder", "proposal") and not uses_proposals(m),
        "'encoder' and 'proposal' content come from selected encoder proposals "
        "(kind two_stage or mixed)",
    ),
    ModelRule(
        "model.queries.num_patterns",
        "model.queries.kind",
        lambda m: m.queries.num_patterns > 0 and _kind(m) != "anchors",
        "patterns repeat learned anchor boxes (kind anchors)",
    ),
    ModelRule(
        "model.queries.random_refpoints_xy",
        "model.queries.kind",
        lambda m: m.queries.random_refpoints_xy and _kind(m) != "anchors",
        "it initialises learned anchor boxes (kind anchors)",
    ),
    ModelRule(
        "model.queries.select_valid_proposals",
        "model.queries.kind",
        lambda m: not m.queries.select_valid_proposals and not uses_proposals(m),
        "it ranks encoder proposals (kind two_stage or mixed); leave it true",
    ),
    ModelRule(
        "model.heads.share_encoder_class",
        "model.queries.kind",
        lambda m: m.heads.share_encoder_class and not uses_proposals(m),
        "only encoder proposals (kind two_stage or mixed) have encoder heads",
    ),
    ModelRule(
        "model.heads.share_encoder_box",
        "model.queries.kind",
        lambda m: m.heads.share_encoder_box and not uses_proposals(m),
        "only encoder proposals (kind two_stage or mixed) have encoder heads",
    ),
    ModelRule(
        "model.heads.share_encoder_class",
        "model.heads.share_decoder_class",
        lambda m: m.heads.share_encoder_class and not m.heads.share_decoder_class,
        "the encoder can only share a decoder class head that all layers share",
    ),
    ModelRule(
        "model.heads.share_encoder_box",
        "model.heads.share_decoder_box",
        lambda m: m.heads.share_encoder_box and not m.heads.share_decoder_box,
        "the encoder can only share a decoder box head that all layers share",
    ),
    ModelRule(
        "model.denoising.kind",
        "model.queries.kind",
        lambda m: m.denoising.kind != "none" and not has_box_queries(m),
        "denoising queries are noised boxes whose positional query is embedded from the "
        "box; it needs kind anchors or mixed",
    ),
    ModelRule(
        "model.denoising.kind",
        "model.class_activation",
        lambda m: m.denoising.kind != "none" and m.class_activation == "softmax",
        "the denoising loss is a sigmoid focal loss",
    ),
    ModelRule(
        "model.queries.kind",
        "model.class_activation",
        lambda m: uses_proposals(m) and m.class_activation == "softmax",
        "encoder proposals are ranked by sigmoid class scores",
    ),
    ModelRule(
        "model.denoising.content_indicator",
        "model.denoising.kind",
        lambda m: m.denoising.content_indicator and m.denoising.kind == "none",
        "the indicator marks denoising queries",
    ),
    ModelRule(
        "model.denoising.content_indicator",
        "model.queries.content",
        lambda m: m.denoising.content_indicator and m.queries.content in ("encoder", "proposal"),
        "selected encoder content is hidden_dim wide and leaves no channel for it",
    ),
    ModelRule(
        "model.denoising.labelbook_size",
        "model.denoising.kind",
        lambda m: m.denoising.labelbook_size is not None and m.denoising.kind == "none",
        "the label book is the denoising label embedding",
    ),
)


def _check_transformer_sizes(m: ModelConfig) -> None:
    t = m.transformer
    for key in (
        "hidden_dim",
        "nheads",
        "dec_layers",
        "dim_feedforward",
        "enc_n_points",
        "dec_n_points",
    ):
        require(getattr(t, key) >= 1, f"model.transformer.{key}", "must be >= 1")
    require(
        t.hidden_dim % t.nheads == 0,
        "model.transformer.hidden_dim",
        f"{t.hidden_dim} is not divisible by model.transformer.nheads={t.nheads}",
    )
    require(
        t.hidden_dim % 4 == 0,
        "model.transformer.hidden_dim",
        f"sine embeddings need a multiple of 4, got {t.hidden_dim}",
    )
    if m.neck.norm == "group_norm":
        require(
            t.hidden_dim % 32 == 0,
            "model.transformer.hidden_dim",
            f"model.neck.norm=group_norm uses GroupNorm(32); {t.hidden_dim} is not a "
            "multiple of 32",
        )
    require(t.enc_layers >= 0, "model.transformer.enc_layers", "must be >= 0")
    require(0.0 <= t.dropout < 1.0, "model.transformer.dropout", "must be in [0, 1)")
    require(
        1 <= t.num_feature_levels <= 5,
        "model.transformer.num_feature_levels",
        f"must be in 1..5, got {t.num_feature_levels}",
    )


def _check_sizes(m: ModelConfig) -> None:
    t, q, b = m.transformer, m.queries, m.backbone
    require(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    _check_transformer_sizes(m)
    require(q.num_queries >= 1, "model.queries.num_queries", "must be >= 1")
    require(q.num_patterns >= 0, "model.queries.num_patterns", "must be >= 0")
    require(
        0.0 < q.inverse_sigmoid_eps < 0.5,
        "model.queries.inverse_sigmoid_eps",
        "must be in (0, 0.5)",
    )
    require(
        not (b.dilation and b.name in ("resnet18", "resnet34")),
        "model.backbone.dilation",
        f"{b.name} has basic blocks, which cannot dilate; use resnet50/101 or false",
    )
    require(0 <= b.frozen_stages <= 4, "model.backbone.frozen_stages", "must be in 0..4")
    if b.levels is not None:
        require(
            len(b.levels) >= 1
            and all(1 <= v <= 4 for v in b.levels)
            and all(x < y for x, y in zip(b.levels, b.levels[1:])),
            "model.backbone.levels",
            f"need increasing stages in 1..4, got {b.levels}",
        )
        require(
            len(b.levels) <= t.num_feature_levels,
            "model.backbone.levels",
            f"{len(b.levels)} stages exceed model.transformer.num_feature_levels="
            f"{t.num_feature_levels}",
        )
    dn = m.denoising
    if dn.kind != "none":
        require(dn.dn_number >= 1, "model.denoising.dn_number", "must be >= 1")
    if dn.labelbook_size is not None:
        require(
            dn.labelbook_size >= m.num_classes,
            "model.denoising.labelbook_size",
            f"must be >= model.num_classes={m.num_classes} (or null), got {dn.labelbook_size}",
        )


def validate_model(m: ModelConfig) -> None:
    """Raise :class:`ConfigError` on a bad size or a combination of :data:`MODEL_RULES`."""
    _check_sizes(m)
    for rule in MODEL_RULES:
        if rule.broken(m):
            raise ConfigError(f"{rule.key}: does not apply with {rule.other} as set: {rule.why}")


def fit_class_count(cfg: Config, have: int, from_data: bool) -> tuple[Config, list[str]]:
    """``model.num_classes`` checked against the ``have`` classes of the training data, or
    (``from_data``: the run did not choose it) set to it; returns the config (validated)
    and notes. More classes in the data than the model has is an error."""
    want = cfg.model.num_classes
    notes = []
    if from_data and have != want:
        model = dataclasses.replace(cfg.model, num_classes=have)
        cfg, notes = fit_to_classes(dataclasses.replace(cfg, model=model))
        notes.insert(0, f"model.num_classes: {have}, the classes of the training data")
    elif have > want:
        raise ConfigError(
            f"model.num_classes: {want} but the training data has {have} classes; set "
            f"model.num_classes={have} (or leave it unset to take the data's)"
        )
    elif have < want:
        notes.append(
            f"model.num_classes: {want} but the training data has {have} classes; "
            f"class indices {have}..{want - 1} have no data and stay unused"
        )
    return cfg.validate(), notes


def fit_to_classes(cfg: Config) -> tuple[Config, list[str]]:
    """Adapt the settings derived from the class count to it, with a note for each change.

    Today one: a top-k ``postprocess.num_select`` larger than the (query, class) pairs it
    selects from (a preset made for 91 COCO classes run on one or two) becomes the number of
    pairs. Returns the adapted copy and the notes (empty when nothing changed)."""
    import dataclasses

    ns, m = cfg.postprocess.num_select, cfg.model
    pairs = m.queries.num_queries * max(m.queries.num_patterns, 1) * m.num_classes
    if ns is None or ns <= pairs or m.class_activation == "softmax":
        return cfg, []
    note = (
        f"postprocess.num_select: {ns} exceeds the {pairs} (query, class) pairs of "
        f"{m.queries.num_queries * max(m.queries.num_patterns, 1)} queries x {m.num_classes} "
        f"classes; using {pairs}"
    )
    post = dataclasses.replace(cfg.postprocess, num_select=pairs)
    return dataclasses.replace(cfg, postprocess=post), [note]


def validate_config(cfg: Config) -> None:
    """Every rule of the tree: the model, then loss, post-processing, training and data."""
    m = cfg.model
    validate_model(m)
    softmax = m.class_activation == "softmax"
    require(
        softmax == (cfg.loss.class_loss == "ce"),
        "loss.class_loss",
        f"'{cfg.loss.class_loss}' does not fit model.class_activation="
        f"'{m.class_activation}' (softmax goes with ce, sigmoid with focal)",
    )
    ns = cfg.postprocess.num_select
    if ns is not None:
        require(ns >= 1, "postprocess.num_select", "must be >= 1 or null")
        require(
            not softmax,
            "postprocess.num_select",
            "top-k selection is for sigmoid models; use null with softmax",
        )
        q = m.queries
        pairs = q.num_queries * max(q.num_patterns, 1) * m.num_classes
        require(
            ns <= pairs,
            "postprocess.num_select",
            f"{ns} exceeds num_queries*max(num_patterns,1)*num_classes={pairs}",
        )
    tr = cfg.train
    require(tr.epochs >= 1, "train.epochs", "must be >= 1")
    require(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
    require(tr.lr > 0, "train.lr", "must be > 0")
    check_train_steps(tr)
    require(
        tr.device in ("auto", "cpu") or tr.device.startswith("cuda"),
        "train.device",
        f"expected auto, cpu, cuda or cuda:N, got '{tr.device}'",
    )
    check_data(cfg.data)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_train_steps(tr: TrainConfig) -> None:
    """The schedule, accumulation, EMA, guard and checkpoint settings of ``train``."""
    require(
        _integer(tr.accumulate) and tr.accumulate >= 1,
        "train.accumulate",
        f"must be an integer >= 1 (batches per optimiser step), got {tr.accumulate!r}",
    )
    require(tr.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {tr.warmup_steps}")
    require(tr.lr_drop >= 1, "train.lr_drop", f"must be >= 1 epoch, got {tr.lr_drop}")
    require(tr.lr_gamma > 0, "train.lr_gamma", f"must be > 0, got {tr.lr_gamma}")
    require(
        0.0 <= tr.lr_min_ratio <= 1.0,
        "train.lr_min_ratio",
        f"must be in [0, 1], got {tr.lr_min_ratio}",
    )
    require(tr.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {tr.max_bad_steps}")
    for key in ("patience", "checkpoint_every_steps", "log_matching_instability"):
        value = getattr(tr, key)
        require(value is None or value >= 1, f"train.{key}", f"must be >= 1 or null, got {value}")
    ema = tr.ema
    require(
        0.0 <= ema.decay < 1.0,
        "train.ema.decay",
        f"must be in [0, 1) (the weight of the old average per step), got {ema.decay}",
    )
    require(
        ema.warmup_steps >= 0,
        "train.ema.warmup_steps",
        f"must be >= 0, got {ema.warmup_steps}",
    )
