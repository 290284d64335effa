"""The detector module and :func:`build_model`, the one place where the config becomes modules.

Data flow of :class:`Detector` (``B`` images, ``d`` = hidden_dim, ``L`` feature levels)::

    images [B,3,H,W], mask [B,H,W] (True = padding)
      -> backbone:  features  [B,C_l,h_l,w_l], masks [B,h_l,w_l]      (ResNet levels)
      -> neck:      srcs      [B,d,h_l,w_l],  masks [B,h_l,w_l]       (L levels, extra levels added)
      -> position:  pos       [B,d,h_l,w_l]                            (per level, from its mask)
      -> transformer(srcs, masks, pos, targets) -> DetectorOutput

The transformer part is any :class:`~detrkit.models.interface.DetectionTransformer`::

    forward(srcs: list[Tensor [B,d,h_l,w_l]], masks: list[Tensor [B,h_l,w_l] bool],
            pos: list[Tensor [B,d,h_l,w_l]], targets: list[Target] | None = None) -> DetectorOutput

It owns encoder, queries, decoder and the class / box heads (official key names below the
``transformer.`` prefix are the converters' business), always fills ``aux`` with every earlier
decoder layer (the detector empties it when ``aux_loss`` is off), sets ``enc`` for two-stage
models and ``dn`` for training-time denoising. It exposes ``hidden_dim`` and ``num_levels``.

State-dict layout: ``backbone.body.*`` (torchvision ResNet names), ``neck.*``
(DETR: ``neck.proj``; multi-level: ``neck.layers.{i}.0|1``), ``position.*`` (learned encoding
only: ``row_embed``, ``col_embed``), ``transformer.*``. Parameters whose name starts with
``backbone.`` are the ones trained with ``train.lr_backbone``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.config import Config, ConfigError, PositionConfig
from detrkit.models.anchor_transformer import AnchorDeformableTransformer
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.conditional import DABTransformer
from detrkit.models.deformable_transformer import DeformableTransformer
from detrkit.models.denoising import DenoisingSettings
from detrkit.models.interface import DetectionTransformer
from detrkit.models.neck import ConvProjection, MultiLevelProjection
from detrkit.models.position import LearnedPositionEncoding, SinePositionEncoding
from detrkit.models.transformer import DETRTransformer
from detrkit.structures import DetectorOutput, Target

__all__ = ["Detector", "build_model", "build_position_encoding", "backbone_levels"]


class Detector(nn.Module):
    """A DETR-family detector: backbone -> neck -> position encodings -> transformer part.

    No pre-processing, loss or post-processing happens here.

    Args:
        backbone: returns feature levels and their masks (:class:`ResNetBackbone`).
        neck: projects them to ``d`` channels (:class:`ConvProjection` /
            :class:`MultiLevelProjection`).
        position: maps a mask ``[B, h, w]`` to an encoding ``[B, d, h, w]``.
        transformer: the :class:`DetectionTransformer` part.
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
        self.backbone = backbone
        self.neck = neck
        self.position = position
        self.transformer = transformer
        self.num_classes = num_classes
        self.class_activation = class_activation
        self.aux_loss = aux_loss

    def forward(self, images: Tensor, mask: Tensor,
                targets: list[Target] | None = None) -> DetectorOutput:
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
            raise ValueError(f"Detector: expected images [B,3,H,W] and mask [B,H,W], got "
                             f"{tuple(images.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"Detector: mask must be bool (True = padding), got {mask.dtype}")
        features, masks = self.backbone(images, mask)
        srcs, masks = self.neck(features, masks, mask)
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]
        out = self.transformer(srcs, masks, pos, targets)
        if not self.aux_loss:
            out.aux = []
        return out


def build_position_encoding(cfg: PositionConfig, hidden_dim: int) -> nn.Module:
    """The position encoding of ``cfg`` with ``hidden_dim / 2`` channels per axis."""
    if hidden_dim % 2 != 0:
        raise ValueError(f"model.transformer.hidden_dim: must be even for the position encoding, "
                         f"got {hidden_dim}")
    if cfg.kind == "learned":
        return LearnedPositionEncoding(hidden_dim // 2)
    return SinePositionEncoding(hidden_dim // 2, cfg.temperature_h, cfg.temperature_w,
                                normalize=cfg.normalize, offset=cfg.offset)


def backbone_levels(cfg: Config) -> list[int]:
    """ResNet stages the model reads: ``model.backbone.levels`` when set, else C5 only for one
    feature level and C3-C5 for several."""
    if cfg.model.backbone.levels is not None:
        return list(cfg.model.backbone.levels)
    if cfg.model.transformer.num_feature_levels == 1:
        return [4]
    return [2, 3, 4]


def build_deformable_part(cfg: Config, num_logits: int, sigmoid: bool) -> DetectionTransformer:
    """The deformable transformer part: Deformable DETR (queries ``reference_points`` /
    ``two_stage``) or the anchor decoders of DAB- / DN-Deformable-DETR and DINO (``anchors`` /
    ``mixed``, optionally with denoising)."""
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    common = dict(hidden_dim=t.hidden_dim, nheads=t.nheads, enc_layers=t.enc_layers,
                  dec_layers=t.dec_layers, dim_feedforward=t.dim_feedforward, dropout=t.dropout,
                  activation=t.activation, num_feature_levels=t.num_feature_levels,
                  enc_n_points=t.enc_n_points, dec_n_points=t.dec_n_points,
                  num_queries=q.num_queries, msda_backend=t.msda_backend)
    if q.kind in ("reference_points", "two_stage"):
        if m.denoising.kind != "none":
            raise ConfigError(f"model.denoising.kind: denoising needs anchor queries "
                              f"(model.queries.kind anchors or mixed), got '{q.kind}'")
        return DeformableTransformer(
            **common, num_logits=num_logits, sigmoid=sigmoid,  # type: ignore[arg-type]
            query_kind=q.kind, box_update=q.box_update,
            select_valid_proposals=q.select_valid_proposals)
    if q.kind not in ("anchors", "mixed") or not sigmoid:
        raise ConfigError(f"model.queries.kind: deformable attention takes reference_points, "
                          f"two_stage, anchors or mixed queries (anchors / mixed with "
                          f"class_activation=sigmoid), got '{q.kind}' / {m.class_activation}")
    dn, h = m.denoising, m.heads
    return AnchorDeformableTransformer(
        **common, num_classes=m.num_classes, query_kind=q.kind,  # type: ignore[arg-type]
        box_update=q.box_update, query_scale=t.decoder_query_scale,
        decoder_norm=t.decoder_norm, share_class_head=h.share_decoder_class,
        share_box_head=h.share_decoder_box, share_encoder_class_head=h.share_encoder_class,
        share_encoder_box_head=h.share_encoder_box,
        select_valid_proposals=q.select_valid_proposals, learned_content=q.learned_content,
        num_patterns=q.num_patterns, random_refpoints_xy=q.random_refpoints_xy,
        denoising=None if dn.kind == "none" else dn.kind,
        denoising_settings=DenoisingSettings(dn.dn_number, dn.label_noise_ratio,
                                             dn.box_noise_scale),
        content_indicator=dn.content_indicator, labelbook_size=dn.labelbook_size)


def build_model(cfg: Config) -> Detector:
    """Build the :class:`Detector` described by ``cfg.model`` (the config is validated first)."""
    cfg.validate()
    m, t = cfg.model, cfg.model.transformer
    b = m.backbone
    backbone = ResNetBackbone(b.name, backbone_levels(cfg), dilation=b.dilation,
                              pretrained=b.pretrained, frozen_stages=b.frozen_stages,
                              norm=b.norm)
    position = build_position_encoding(m.position, t.hidden_dim)
    sigmoid = m.class_activation == "sigmoid"
    num_logits = m.num_classes if sigmoid else m.num_classes + 1

    neck: nn.Module
    transformer: DetectionTransformer
    if t.attention == "deformable":
        # Deformable DETR / DAB- / DN-Deformable DETR / DINO: multi-level neck + deformable part.
        neck = MultiLevelProjection(backbone.num_channels, t.hidden_dim, t.num_feature_levels)
        transformer = build_deformable_part(cfg, num_logits, sigmoid)
    elif m.queries.kind == "learned" and m.denoising.kind == "none":
        neck = ConvProjection(backbone.num_channels[-1], t.hidden_dim)
        transformer = DETRTransformer(
            hidden_dim=t.hidden_dim, nheads=t.nheads, enc_layers=t.enc_layers,
            dec_layers=t.dec_layers, dim_feedforward=t.dim_feedforward, dropout=t.dropout,
            activation=t.activation, pre_norm=t.pre_norm, num_queries=m.queries.num_queries,
            num_logits=num_logits, sigmoid=sigmoid)
    elif m.queries.kind == "anchors":
        # single-scale DAB-DETR / DN-DETR: conditional attention on C5, 4-D anchor queries
        if not sigmoid or t.pre_norm or m.denoising.kind == "cdn":
            raise ConfigError(
                "model.queries.kind: anchors with global attention (DAB-DETR / DN-DETR) needs "
                "model.class_activation=sigmoid, model.transformer.pre_norm=false and "
                "model.denoising.kind none or dn")
        neck = ConvProjection(backbone.num_channels[-1], t.hidden_dim)
        dn = m.denoising
        transformer = DABTransformer(
            hidden_dim=t.hidden_dim, nheads=t.nheads, enc_layers=t.enc_layers,
            dec_layers=t.dec_layers, dim_feedforward=t.dim_feedforward, dropout=t.dropout,
            activation=t.activation, num_queries=m.queries.num_queries,
            num_classes=m.num_classes, num_patterns=m.queries.num_patterns,
            modulate_hw_attn=t.modulate_hw_attn,
            random_refpoints_xy=m.queries.random_refpoints_xy,
            denoising=DenoisingSettings(dn.dn_number, dn.label_noise_ratio, dn.box_noise_scale)
            if dn.kind == "dn" else None)
    else:
        raise NotImplementedError(
            f"model.queries.kind={m.queries.kind!r} / model.denoising.kind={m.denoising.kind!r} "
            "with global attention is not available")
    return Detector(backbone, neck, position, transformer, num_classes=m.num_classes,
                    class_activation=m.class_activation, aux_loss=m.aux_loss)

