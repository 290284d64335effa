"""DAB-DETR (Liu et al., 2022) and DN-DETR (Li et al., 2022): 4-D anchor queries refined layer
by layer, on single-scale features with conditional attention (IDEA-Research/DAB-DETR,
IDEA-Research/DN-DETR) or on the Deformable DETR encoder and decoder (``dab_deformable``)."""

from __future__ import annotations

from detrkit.config import Config
from detrkit.presets.deformable import deformable
from detrkit.presets.registry import register

__all__ = ["dab", "dab_deformable"]


def _dn(cfg: Config) -> None:
    """DN-DETR's denoising: 5 groups, label noise 0.2, box noise 0.4, content = label
    embedding (hidden_dim - 1 wide) plus the denoising indicator."""
    dn = cfg.model.denoising
    dn.kind, dn.dn_number, dn.label_noise_ratio, dn.box_noise_scale = "dn", 5, 0.2, 0.4
    dn.content_indicator = True


def dab(backbone: str = "resnet50", denoising: bool = False) -> Config:
    """Single-scale DAB-DETR at the official defaults with the published 50-epoch schedule:
    conditional attention, width/height-modulated cross-attention, PReLU, one shared head;
    ``denoising`` gives DN-DETR (whose matching queries start from the "unknown" label)."""
    cfg = Config()
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    m.backbone.name = backbone  # type: ignore[assignment]
    m.class_activation = "sigmoid"
    m.position.temperature_h = m.position.temperature_w = 20.0
    t.attention = "global"
    t.activation = "prelu"
    t.dropout = 0.0
    t.conditional_attention = True
    t.encoder_query_scale = t.decoder_query_scale = True
    t.modulate_hw_attn = True
    # the official single-scale decoder returns each layer's refined anchor undetached as the
    # reference of the next layer's prediction (and detaches only its input): look forward twice
    q.kind, q.box_update, q.num_queries = "anchors", "look_forward_twice", 300
    q.inverse_sigmoid_eps = 1e-3
    m.heads.share_decoder_class = m.heads.share_decoder_box = True
    if denoising:
        _dn(cfg)
        q.content = "label"
    loss = cfg.loss
    loss.class_loss = "focal"
    loss.class_weight, loss.bbox_weight, loss.giou_weight = 1.0, 5.0, 2.0
    loss.log_xy_hw = True
    loss.matcher.cost_class, loss.matcher.cost_bbox, loss.matcher.cost_giou = 2.0, 5.0, 2.0
    cfg.postprocess.num_select = 300
    tr = cfg.train
    tr.lr, tr.lr_backbone = 1e-4, 1e-5
    tr.epochs, tr.lr_drop, tr.batch_size = 50, 40, 2
    return cfg


def dab_deformable(backbone: str = "resnet50", denoising: bool = False) -> Config:
    """DAB-Deformable-DETR (IDEA-Research/DAB-DETR ``-m dab_deformable_detr``): Deformable DETR
    with learned 4-D anchors, content-scaled positional queries and anchor refinement, 50
    epochs; ``denoising`` gives DN-Deformable-DETR (IDEA-Research/DN-DETR
    ``-m dn_dab_deformable_detr --use_dn``)."""
    cfg = deformable(4, query_kind="anchors", box_update="refine", backbone=backbone)
    t = cfg.model.transformer
    t.dim_feedforward, t.dropout = 2048, 0.0
    t.decoder_query_scale = True
    cfg.model.queries.inverse_sigmoid_eps = 1e-3
    if denoising:
        _dn(cfg)
    cfg.loss.class_weight = 1.0
    tr = cfg.train
    tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult = 1e-4, 1e-5, 1.0
    return cfg


@register
def dab_detr_r50() -> Config:
    """Single-scale DAB-DETR: 4-D anchor queries, conditional attention, PReLU."""
    return dab()


@register
def dn_detr_r50() -> Config:
    """Single-scale DN-DETR: DAB-DETR trained with denoising queries."""
    return dab(denoising=True)


@register
def dab_deformable_detr_r50() -> Config:
    """DAB-Deformable-DETR, ResNet-50, 4 levels, 300 anchor queries."""
    return dab_deformable()


@register
def dn_deformable_detr_r50() -> Config:
    """DN-Deformable-DETR, ResNet-50: DAB-Deformable-DETR trained with denoising queries."""
    return dab_deformable(denoising=True)
