"""The model part of the config tree: which parts the one detection transformer is built from.

Every field is a typed switch or size; :func:`detrkit.models.build_model` is the only reader.
Combinations that would build a model in which a switch does nothing are refused by
:func:`detrkit.config.validate.validate_model` with a line naming both fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "BackboneConfig",
    "NeckConfig",
    "PositionConfig",
    "TransformerConfig",
    "QueryConfig",
    "HeadConfig",
    "DenoisingConfig",
    "ModelConfig",
    "QueryKind",
    "ContentKind",
    "BoxUpdate",
    "Attention",
]

Attention = Literal["global", "deformable"]
QueryKind = Literal["learned", "reference_points", "anchors", "two_stage", "mixed"]
ContentKind = Literal["zero", "learned", "label", "encoder", "proposal"]
BoxUpdate = Literal["none", "refine", "look_forward_twice"]


@dataclass
class BackboneConfig:
    """torchvision ResNet; frozen batch norm as in every published system, or trainable batch
    norm for a backbone trained from random weights."""

    name: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    dilation: bool = False  # DC5: the last stage keeps stride 16 (bottleneck ResNets only)
    pretrained: bool = False  # torchvision ImageNet weights (a download: fails offline)
    frozen_stages: int = 1  # 0 = none (frozen_bn stays fixed), 1 = stem + layer1 (official) .. 4
    # frozen_bn: fixed statistics and affine terms (official; right for pretrained weights).
    # bn: trainable batch norm with running statistics, for training from random weights:
    # without it nothing normalises a single-scale model's features and their scale grows
    # until the gradients overflow.
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    # ResNet stages fed to the neck (1 = C2 .. 4 = C5). null: C5 alone for one feature level,
    # C3-C5 otherwise. DINO-5scale: [1, 2, 3, 4] (C2-C5 plus one extra strided level).
    levels: list[int] | None = None


@dataclass
class NeckConfig:
    """Projection of the backbone levels to the transformer width: a 1x1 convolution per
    level, then 3x3 stride-2 convolutions for the extra levels."""

    # group_norm: GroupNorm(32) after every convolution (Deformable DETR, DINO). none: the
    # bare convolutions (DETR, DAB-DETR).
    norm: Literal["none", "group_norm"] = "none"


@dataclass
class PositionConfig:
    """2-D position encoding of the feature maps."""

    kind: Literal["sine", "learned"] = "sine"
    temperature_h: float = 10000.0
    temperature_w: float = 10000.0
    normalize: bool = True
    # subtracted from the cumulative position before normalising: 0.0 (DETR), 0.5 (Deformable)
    offset: float = 0.0


@dataclass
class TransformerConfig:
    """Encoder and decoder layers. ``attention`` picks the attention of the encoder and of the
    decoder's cross-attention; every other switch here works with both kinds."""

    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: Literal["relu", "gelu", "prelu"] = "relu"
    pre_norm: bool = False  # LayerNorm before each block (and a final encoder norm)
    # global: multi-head attention over every token of every level. deformable: multi-scale
    # deformable attention around reference points.
    attention: Attention = "global"
    num_feature_levels: int = 1  # 1 to 5; a level embedding is learned when > 1 or deformable
    enc_n_points: int = 4  # deformable: sampling points per head and level
    dec_n_points: int = 4
    # deformable only; auto: triton on CUDA, sparse on CPU; gather: bilinear gathers instead of
    # grid_sample (exports at any opset); sparse: one sparse-dense product (CPU)
    msda_backend: Literal["auto", "reference", "gather", "sparse", "triton"] = "auto"
    # DAB-DETR's conditional attention (global attention only): separate content / position
    # projections, and cross-attention keys and queries that concatenate, per head, content
    # with position (the sine embedding of the reference centre). Needs a reference.
    conditional_attention: bool = False
    # the encoder multiplies its position encoding, before every layer, by an MLP of the
    # layer input (DAB-DETR)
    encoder_query_scale: bool = False
    # decoder layers >= 1 multiply their cross-attention positional query by an MLP of the
    # content (DAB-DETR, DAB / DN-Deformable DETR; with conditional attention it scales the
    # reference's sine embedding)
    decoder_query_scale: bool = False
    # a LayerNorm on every decoder layer's output before the heads (DETR, DAB-DETR, DINO)
    decoder_norm: bool = True
    # conditional attention: scale the x / y halves of the reference embedding by the ratio of
    # a predicted width / height to the anchor's (DAB-DETR)
    modulate_hw_attn: bool = False


@dataclass
class QueryConfig:
    """How decoder queries start and how their boxes evolve across decoder layers.

    ``kind`` gives the positional part and the reference box of every query:

    * ``learned``: a learned positional embedding, no reference (DETR);
    * ``reference_points``: a learned positional embedding and a 2-D reference point
      predicted from it (Deformable DETR);
    * ``anchors``: learned 4-D anchor boxes; the positional query of every layer is embedded
      from the current anchor (DAB-DETR);
    * ``two_stage``: the top encoder proposals by objectness (class 0) are the references; a
      projection of their sine embedding is the positional query (two-stage Deformable DETR);
    * ``mixed``: the top encoder proposals by their best class are the anchors, embedded every
      layer like ``anchors`` (DINO's mixed query selection).
    """

    num_queries: int = 100
    kind: QueryKind = "learned"
    # none: boxes are predicted relative to the fixed reference. refine: every layer refines
    # the previous layer's (detached) box. look_forward_twice: as refine, but a layer's box is
    # also supervised through the next layer's prediction (DINO).
    box_update: BoxUpdate = "none"
    # the content part of the matching queries: zero (DETR, DAB-DETR), learned (one vector per
    # query), label (the label embedding's "unknown" row, DN-DETR; needs denoising), encoder
    # (the selected encoder features, detached) or proposal (a projection of the selected
    # proposal's sine embedding, two-stage Deformable DETR); the last two need proposals.
    content: ContentKind = "zero"
    # two_stage / mixed: never pick padding / out-of-range encoder tokens as proposals while
    # enough valid ones exist. false = the official ranking (every token by score).
    select_valid_proposals: bool = True
    # anchors: every anchor box is used with each of num_patterns learned content vectors
    # (num_queries * num_patterns decoder queries); 0 = one per anchor
    num_patterns: int = 0
    # anchors: initialise the anchor centres uniformly at random and keep them fixed
    random_refpoints_xy: bool = False
    # clamp of the inverse sigmoid in box refinement and denoising boxes: 1e-5 in Deformable
    # DETR, 1e-3 in DAB-DETR, DN-DETR and DINO
    inverse_sigmoid_eps: float = 1e-5


@dataclass
class HeadConfig:
    """Class / box heads: one for every decoder layer (DETR, Deformable DETR without
    refinement, DAB-DETR, DINO) or one per layer (refining Deformable / DAB-Deformable DETR)."""

    share_decoder_class: bool = True  # DINO dec_pred_class_embed_share
    share_decoder_box: bool = True  # DINO dec_pred_bbox_embed_share
    # two_stage / mixed: the encoder proposals use the (shared) decoder head instead of their
    # own (two-stage Deformable DETR without refinement: true; DINO two_stage_*_embed_share)
    share_encoder_class: bool = False
    share_encoder_box: bool = False


@dataclass
class DenoisingConfig:
    """Training-time denoising queries. ``dn`` (DN-DETR): ``dn_number`` groups of noised
    ground truth, label flip probability ``label_noise_ratio``. ``cdn`` (DINO): positive and
    negative groups, ``dn_number`` is the query budget, flip probability
    ``label_noise_ratio / 2``. ``box_noise_scale``: box jitter relative to the box size."""

    kind: Literal["none", "dn", "cdn"] = "none"
    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    # rows of the denoising label embedding minus one (the extra row is "unknown");
    # null = num_classes. DINO's dn_labelbook_size.
    labelbook_size: int | None = None
    # content = label embedding of width hidden_dim - 1 plus a 0/1 "is denoising" indicator
    # (DN-DETR, DN-Deformable-DETR); false: label embedding of width hidden_dim (DINO)
    content_indicator: bool = False


@dataclass
class ModelConfig:
    """The detector: backbone -> neck -> position encoding -> detection transformer."""

    num_classes: int = 91
    # softmax: num_classes + 1 logits, the last is "no object" (DETR). sigmoid: num_classes logits.
    class_activation: Literal["softmax", "sigmoid"] = "softmax"
    aux_loss: bool = True  # return (and supervise) every decoder layer, not just the last
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
