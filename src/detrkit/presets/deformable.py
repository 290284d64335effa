"""Deformable DETR (Zhu et al., 2021) at the fundamentalvision/Deformable-DETR defaults
(50 epochs, learning rate drop after 40, batch size 2 per GPU)."""

from __future__ import annotations

from detrkit.config import Config
from detrkit.presets.registry import register

__all__ = ["deformable"]


def deformable(
    num_feature_levels: int = 4,
    dilation: bool = False,
    query_kind: str = "reference_points",
    box_update: str = "none",
    backbone: str = "resnet50",
) -> Config:
    """Multi-scale deformable attention, GroupNorm neck, sigmoid classes with focal loss;
    ``query_kind`` ``reference_points`` (learned queries with 2-D points) or ``two_stage``."""
    cfg = Config()
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    m.backbone.name = backbone  # type: ignore[assignment]
    m.backbone.dilation = dilation
    m.class_activation = "sigmoid"
    m.neck.norm = "group_norm"
    m.position.offset = 0.5
    t.attention = "deformable"
    t.num_feature_levels = num_feature_levels
    t.enc_n_points = t.dec_n_points = 4
    t.dim_feedforward = 1024
    t.dropout = 0.1
    t.decoder_norm = False
    q.num_queries = 300
    q.kind = query_kind  # type: ignore[assignment]
    q.box_update = box_update  # type: ignore[assignment]
    q.content = "proposal" if query_kind == "two_stage" else "learned"
    # one head per layer with refinement; without, one head (also for the proposals)
    shared = box_update == "none"
    m.heads.share_decoder_class = m.heads.share_decoder_box = shared
    if query_kind == "two_stage":
        m.heads.share_encoder_class = m.heads.share_encoder_box = shared
    loss = cfg.loss
    loss.class_loss = "focal"
    loss.class_weight, loss.bbox_weight, loss.giou_weight = 2.0, 5.0, 2.0
    loss.matcher.cost_class, loss.matcher.cost_bbox, loss.matcher.cost_giou = 2.0, 5.0, 2.0
    cfg.postprocess.num_select = 100
    tr = cfg.train
    tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult = 2e-4, 2e-5, 0.1
    tr.epochs, tr.lr_drop, tr.batch_size = 50, 40, 2
    return cfg


@register
def deformable_detr_r50() -> Config:
    """Multi-scale (C3-C5 + one extra level) Deformable DETR."""
    return deformable(4)


@register
def deformable_detr_r50_single_scale() -> Config:
    """Single-scale Deformable DETR: C5 only."""
    return deformable(1)


@register
def deformable_detr_r50_single_scale_dc5() -> Config:
    """Single-scale Deformable DETR on a dilated C5 (stride 16)."""
    return deformable(1, dilation=True)


@register
def deformable_detr_r50_refine() -> Config:
    """Deformable DETR with iterative bounding box refinement."""
    return deformable(4, box_update="refine")


@register
def deformable_detr_r50_two_stage() -> Config:
    """Two-stage Deformable DETR with iterative bounding box refinement."""
    return deformable(4, query_kind="two_stage", box_update="refine")
