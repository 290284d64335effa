"""DINO (Zhang et al., 2023; IDEA-Research/DINO ``config/DINO/DINO_4scale.py``)."""

from __future__ import annotations

from detrkit.config import Config
from detrkit.presets.deformable import deformable
from detrkit.presets.registry import register

__all__ = ["dino"]


def dino(num_feature_levels: int = 4, backbone: str = "resnet50") -> Config:
    """Contrastive denoising (budget 100 queries, label noise 0.5, box noise 0.4), mixed query
    selection of 900 anchors, look-forward-twice box refinement, shared decoder heads, 12
    epochs."""
    cfg = deformable(
        num_feature_levels, query_kind="mixed", box_update="look_forward_twice", backbone=backbone
    )
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    if num_feature_levels == 5:
        m.backbone.levels = [1, 2, 3, 4]  # C2-C5 plus one strided level
    m.position.temperature_h = m.position.temperature_w = 20.0
    m.position.offset = 0.0
    t.dim_feedforward, t.dropout = 2048, 0.0
    t.decoder_norm = True
    q.num_queries, q.content, q.inverse_sigmoid_eps = 900, "learned", 1e-3
    m.heads.share_decoder_class = m.heads.share_decoder_box = True
    m.heads.share_encoder_class = m.heads.share_encoder_box = False
    dn = m.denoising
    dn.kind, dn.dn_number, dn.label_noise_ratio, dn.box_noise_scale = "cdn", 100, 0.5, 0.4
    cfg.loss.class_weight = 1.0
    cfg.loss.log_xy_hw = True
    cfg.postprocess.num_select = 300
    tr = cfg.train
    tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult = 1e-4, 1e-5, 0.1
    tr.epochs, tr.lr_drop, tr.batch_size = 12, 11, 2
    return cfg


@register
def dino_4scale_r50() -> Config:
    """DINO-4scale, ResNet-50 (C3-C5 plus one strided level), 12-epoch schedule."""
    return dino(4)


@register
def dino_5scale_r50() -> Config:
    """DINO-5scale, ResNet-50 (C2-C5 plus one strided level), 12-epoch schedule."""
    return dino(5)
