"""The detector module and :func:`build_model`, the one place where the config becomes modules.

Data flow of :class:`DetectionModel` (``B`` images, ``d`` = hidden_dim, ``L`` levels)::

    images [B,3,H,W], mask [B,H,W] (True = padding)
      -> backbone:    features [B,C_l,h_l,w_l], masks [B,h_l,w_l]     (ResNet stages)
      -> neck:        srcs [B,d,h_l,w_l], masks [B,h_l,w_l]            (L levels)
      -> position:    pos [B,d,h_l,w_l]                                 (per level, from its mask)
      -> transformer: DetectorOutput (logits [B,Q,C], boxes [B,Q,4] normalised cxcywh, ...)

State-dict layout: ``backbone.body.*`` (torchvision ResNet names), ``neck.layers.{i}.*``,
``position.*`` (learned encoding only), ``transformer.*`` (see
:mod:`detrkit.models.transformer`). Parameters under ``backbone.`` train with
``train.lr_backbone``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.config import Config, ModelConfig, PositionConfig, TransformerConfig
from detrkit.config.validate import has_box_queries, uses_proposals
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.decoder import Decoder
from detrkit.models.denoising_branch import DenoisingBranch
from detrkit.models.encoder import Encoder
from detrkit.models.heads import Heads
from detrkit.models.layers import LayerSpec
from detrkit.models.neck import FeatureProjection
from detrkit.models.position import LearnedPositionEncoding, SinePositionEncoding
from detrkit.models.queries import QueryInitialiser
from detrkit.models.transformer import DetectionTransformer
from detrkit.structures import DetectorOutput, Target

__all__ = [
    "DetectionModel",
    "build_model",
    "build_position_encoding",
    "backbone_levels",
    "build_transformer",
]


class DetectionModel(nn.Module):
    """A DETR-family detector: backbone -> neck -> position encodings -> transformer.

    No pre-processing, loss or post-processing happens here.

    Args:
        backbone: returns feature levels and their masks (:class:`ResNetBackbone`).
        neck: projects them to ``d`` channels (:class:`FeatureProjection`).
        position: maps a mask ``[B, h, w]`` to an encoding ``[B, d, h, w]``.
        transformer: the :class:`DetectionTransformer`.
        num_classes: number of real classes.
        class_activation: ``softmax`` (``num_classes + 1`` logits, last = "no object") or
            ``sigmoid`` (``num_classes`` logits).
        aux_loss: return the earlier decoder layers in ``DetectorOutput.aux``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        position: nn.Module,
        transformer: DetectionTransformer,
        num_classes: int,
        class_activation: str = "softmax",
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.position = backbone, neck, position
        self.transformer = transformer
        self.num_classes = num_classes
        self.class_activation = class_activation
        self.aux_loss = aux_loss

    def forward(
        self, images: Tensor, mask: Tensor, targets: list[Target] | None = None
    ) -> DetectorOutput:
        """Detect objects in a padded batch.

        Args:
            images: ``[B, 3, H, W]`` normalised images, each in the top-left corner.
            mask: ``[B, H, W]`` bool, ``True`` on padding.
            targets: ground truth (only used by training-time denoising).

        Returns:
            :class:`DetectorOutput` with ``logits`` ``[B, Q, C]`` and ``boxes`` ``[B, Q, 4]``
            (normalised cxcywh relative to each image's unpadded size) of the last decoder
            layer, ``aux`` (earlier layers, if ``aux_loss``), ``enc`` and ``dn`` when present.
        """
        if images.dim() != 4 or mask.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"DetectionModel: expected images [B,3,H,W] and mask [B,H,W], got "
                f"{tuple(images.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(
                f"DetectionModel: mask must be bool (True = padding), got {mask.dtype}"
            )
        features, masks = self.backbone(images, mask)
        srcs, masks = self.neck(features, masks, mask)
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]
        out = self.transformer(srcs, masks, pos, targets)
        if not self.aux_loss:
            out.aux = []
        return out

    def class_dependent_keys(self) -> list[str]:
        """State-dict keys whose values are tied to the classes: the class heads of every
        decoder layer and of the encoder proposals, and the denoising label embedding. They
        are what a start from weights trained on other classes re-initialises."""
        t = self.transformer
        modules = {"transformer.heads.class_embed": t.heads.class_embed}
        if t.heads.enc_class_embed is not None:
            modules["transformer.heads.enc_class_embed"] = t.heads.enc_class_embed
        if t.denoising is not None:
            modules["transformer.denoising.label_enc"] = t.denoising.label_enc
        return [f"{prefix}.{name}" for prefix, m in modules.items() for name in m.state_dict()]

    def query_dependent_keys(self) -> list[str]:
        """State-dict keys with one row per query (learned positional queries, anchors,
        learned content): what a start from weights with another ``num_queries``
        re-initialises."""
        q = self.transformer.queries
        names = ("query_pos", "anchors", "content")
        return [
            f"transformer.queries.{name}.weight" for name in names if getattr(q, name) is not None
        ]


def build_position_encoding(cfg: PositionConfig, hidden_dim: int) -> nn.Module:
    """The position encoding of ``cfg`` with ``hidden_dim / 2`` channels per axis."""
    if cfg.kind == "learned":
        return LearnedPositionEncoding(hidden_dim // 2)
    return SinePositionEncoding(
        hidden_dim // 2,
        cfg.temperature_h,
        cfg.temperature_w,
        normalize=cfg.normalize,
        offset=cfg.offset,
    )


def backbone_levels(cfg: Config) -> list[int]:
    """ResNet stages the model reads: ``model.backbone.levels`` when set, else C5 only for one
    feature level and C3-C5 for several."""
    if cfg.model.backbone.levels is not None:
        return list(cfg.model.backbone.levels)
    return [4] if cfg.model.transformer.num_feature_levels == 1 else [2, 3, 4]


def _layer_spec(t: TransformerConfig, n_points: int) -> LayerSpec:
    return LayerSpec(
        d_model=t.hidden_dim,
        nheads=t.nheads,
        dim_feedforward=t.dim_feedforward,
        dropout=t.dropout,
        activation=t.activation,
        pre_norm=t.pre_norm,
        attention=t.attention,
        n_levels=t.num_feature_levels,
        n_points=n_points,
        msda_backend=t.msda_backend,
    )


def _heads(m: ModelConfig) -> Heads:
    sigmoid, h, q = m.class_activation == "sigmoid", m.heads, m.queries
    return Heads(
        m.transformer.hidden_dim,
        m.num_classes if sigmoid else m.num_classes + 1,
        m.transformer.dec_layers,
        h.share_decoder_class,
        h.share_decoder_box,
        own_encoder=(
            uses_proposals(m) and not h.share_encoder_class,
            uses_proposals(m) and not h.share_encoder_box,
        ),
        sigmoid=sigmoid,
        relative=q.kind != "learned",
        small_first_box=q.kind == "reference_points",
        eps=q.inverse_sigmoid_eps,
    )


def _denoising(m: ModelConfig, indicator: bool) -> DenoisingBranch | None:
    dn = m.denoising
    if dn.kind == "none":
        return None
    return DenoisingBranch(
        dn.kind,
        m.num_classes,
        dn.labelbook_size,
        m.transformer.hidden_dim - int(indicator),
        dn.dn_number,
        dn.label_noise_ratio,
        dn.box_noise_scale,
        indicator,
        m.queries.inverse_sigmoid_eps,
    )


def build_transformer(cfg: Config) -> DetectionTransformer:
    """The :class:`DetectionTransformer` of ``cfg.model`` (validated)."""
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    indicator = m.denoising.kind != "none" and m.denoising.content_indicator
    queries = QueryInitialiser(
        q.kind,
        q.content,
        t.hidden_dim,
        q.num_queries,
        q.num_patterns,
        indicator=indicator,
        random_refpoints_xy=q.random_refpoints_xy,
        select_valid_proposals=q.select_valid_proposals,
        eps=q.inverse_sigmoid_eps,
    )
    decoder = Decoder(
        _layer_spec(t, t.dec_n_points),
        t.dec_layers,
        conditional=t.conditional_attention,
        anchor_pos=has_box_queries(m),
        query_scale=t.decoder_query_scale,
        modulate_hw=t.modulate_hw_attn,
        final_norm=t.decoder_norm,
        box_update=q.box_update,
        eps=q.inverse_sigmoid_eps,
    )
    encoder = Encoder(_layer_spec(t, t.enc_n_points), t.enc_layers, t.encoder_query_scale)
    return DetectionTransformer(
        t.hidden_dim,
        t.num_feature_levels,
        level_embed=t.attention == "deformable" or t.num_feature_levels > 1,
        encoder=encoder,
        queries=queries,
        decoder=decoder,
        heads=_heads(m),
        denoising=_denoising(m, indicator),
    )


def build_model(cfg: Config) -> DetectionModel:
    """Build the :class:`DetectionModel` described by ``cfg.model`` (validated first)."""
    cfg.validate()
    m, t, b = cfg.model, cfg.model.transformer, cfg.model.backbone
    backbone = ResNetBackbone(
        b.name,
        backbone_levels(cfg),
        dilation=b.dilation,
        pretrained=b.pretrained,
        frozen_stages=b.frozen_stages,
        norm=b.norm,
    )
    neck = FeatureProjection(backbone.num_channels, t.hidden_dim, t.num_feature_levels, m.neck.norm)
    return DetectionModel(
        backbone,
        neck,
        build_position_encoding(m.position, t.hidden_dim),
        build_transformer(cfg),
        num_classes=m.num_classes,
        class_activation=m.class_activation,
        aux_loss=m.aux_loss,
    )
