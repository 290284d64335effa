"""Named configurations: the published systems at their official settings, plus tiny
variants (``test_*``) that build and train in seconds on a CPU.

Every preset is a function returning a fresh :class:`~detrkit.config.Config`; register new
ones with :func:`register`. ``list_presets()`` drives the test suite, so every preset here is
built and run automatically.
"""

from __future__ import annotations

from typing import Callable

from detrkit.config import Config, ConfigError

__all__ = ["register", "get_preset", "list_presets"]

_PRESETS: dict[str, Callable[[], Config]] = {}


def register(fn: Callable[[], Config]) -> Callable[[], Config]:
    """Decorator: register ``fn`` under its function name."""
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets() -> list[str]:
    """All preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Config:
    """A fresh, validated config for preset ``name``."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(list_presets())}")
    return _PRESETS[name]().validate()


# ----------------------------------------------------------------------------- DETR


def _detr(backbone: str = "resnet50", dilation: bool = False) -> Config:
    """DETR (Carion et al., 2020) at the facebookresearch/detr defaults (300-epoch schedule)."""
    cfg = Config()
    cfg.model.backbone.name = backbone  # type: ignore[assignment]
    cfg.model.backbone.dilation = dilation
    cfg.train.epochs = 300
    cfg.train.lr_drop = 200
    return cfg


@register
def detr_r50() -> Config:
    return _detr("resnet50")


@register
def detr_r50_dc5() -> Config:
    return _detr("resnet50", dilation=True)


@register
def detr_r101() -> Config:
    return _detr("resnet101")


@register
def detr_r101_dc5() -> Config:
    return _detr("resnet101", dilation=True)


def _tiny_data(cfg: Config) -> Config:
    """Small images and a short schedule on the synthetic shapes data (CPU friendly)."""
    d = cfg.data
    d.format = "synthetic"
    d.synthetic.image_size = 128
    d.augment.train_scales = [112, 128, 144]
    d.augment.max_size = 192
    d.augment.crop = False
    d.augment.val_scale = 128
    cfg.train.batch_size = 8
    cfg.train.epochs = 6
    cfg.train.lr_drop = 5
    cfg.train.lr = 2e-4
    cfg.train.lr_backbone = 2e-5
    return cfg


@register
def test_detr_tiny() -> Config:
    """DETR with a ResNet-18 and a 2+2-layer, 64-wide transformer: for tests and the demo."""
    cfg = _detr("resnet18")
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward = 64, 4, 2, 2, 128
    cfg.model.queries.num_queries = 20
    cfg.model.num_classes = 4
    cfg.model.transformer.dropout = 0.0
    return _tiny_data(cfg)


# ----------------------------------------------------------------------------- Deformable DETR


def _deformable(num_feature_levels: int = 4, dilation: bool = False,
                query_kind: str = "reference_points", box_update: str = "none",
                backbone: str = "resnet50") -> Config:
    """Deformable DETR (Zhu et al., 2021) at the fundamentalvision/Deformable-DETR defaults
    (50 epochs, learning rate drop after 40, batch size 2 per GPU)."""
    cfg = Config()
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    m.backbone.name = backbone  # type: ignore[assignment]
    m.backbone.dilation = dilation
    m.class_activation = "sigmoid"
    m.position.offset = 0.5
    t.attention = "deformable"
    t.num_feature_levels = num_feature_levels
    t.enc_n_points = t.dec_n_points = 4
    t.dim_feedforward = 1024
    t.dropout = 0.1
    q.num_queries = 300
    q.kind = query_kind  # type: ignore[assignment]
    q.box_update = box_update  # type: ignore[assignment]
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
    return _deformable(4)


@register
def deformable_detr_r50_single_scale() -> Config:
    """Single-scale Deformable DETR: C5 only."""
    return _deformable(1)


@register
def deformable_detr_r50_single_scale_dc5() -> Config:
    """Single-scale Deformable DETR on a dilated C5 (stride 16)."""
    return _deformable(1, dilation=True)


@register
def deformable_detr_r50_refine() -> Config:
    """Deformable DETR with iterative bounding box refinement."""
    return _deformable(4, box_update="refine")


@register
def deformable_detr_r50_two_stage() -> Config:
    """Two-stage Deformable DETR with iterative bounding box refinement."""
    return _deformable(4, query_kind="two_stage", box_update="refine")


def _tiny_deformable(query_kind: str = "reference_points", box_update: str = "none",
                     num_feature_levels: int = 4) -> Config:
    """Deformable DETR on a ResNet-18 (C3-C5: 128/256/512 channels) with a 2+2-layer,
    64-wide transformer, on the synthetic shapes data."""
    cfg = _deformable(num_feature_levels, query_kind=query_kind, box_update=box_update,
                      backbone="resnet18")
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward = 64, 4, 2, 2, 128
    t.dropout = 0.0
    cfg.model.queries.num_queries = 30  # 30 queries x 4 classes >= the 100 selected detections
    cfg.model.num_classes = 4
    cfg = _tiny_data(cfg)
    cfg.train.lr_linear_proj_mult = 0.1
    return cfg


@register
def test_deformable_detr_tiny() -> Config:
    return _tiny_deformable()


@register
def test_deformable_detr_tiny_single_scale() -> Config:
    return _tiny_deformable(num_feature_levels=1)


@register
def test_deformable_detr_tiny_refine() -> Config:
    return _tiny_deformable(box_update="refine")


@register
def test_deformable_detr_tiny_two_stage() -> Config:
    return _tiny_deformable(query_kind="two_stage", box_update="refine")


# ----------------------------------------------------------------------------- DAB-DETR / DN-DETR


def _dab(backbone: str = "resnet50", denoising: bool = False) -> Config:
    """Single-scale DAB-DETR (Liu et al., 2022) at the IDEA-Research/DAB-DETR defaults, with the
    published 50-epoch schedule; ``denoising`` adds DN-DETR's denoising queries (Li et al.,
    2022: 5 groups, label noise 0.2, box noise 0.4)."""
    cfg = Config()
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    m.backbone.name = backbone  # type: ignore[assignment]
    m.class_activation = "sigmoid"
    m.position.temperature_h = m.position.temperature_w = 20.0
    t.attention = "global"
    t.activation = "prelu"
    t.dropout = 0.0
    q.kind = "anchors"
    q.box_update = "refine"
    q.num_queries = 300
    if denoising:
        m.denoising.kind = "dn"
        m.denoising.dn_number = 5
        m.denoising.label_noise_ratio = 0.2
        m.denoising.box_noise_scale = 0.4
    loss = cfg.loss
    loss.class_loss = "focal"
    loss.class_weight, loss.bbox_weight, loss.giou_weight = 1.0, 5.0, 2.0
    loss.matcher.cost_class, loss.matcher.cost_bbox, loss.matcher.cost_giou = 2.0, 5.0, 2.0
    cfg.postprocess.num_select = 300
    tr = cfg.train
    tr.lr, tr.lr_backbone = 1e-4, 1e-5
    tr.epochs, tr.lr_drop, tr.batch_size = 50, 40, 2
    return cfg


@register
def dab_detr_r50() -> Config:
    """Single-scale DAB-DETR: 4-D anchor queries, conditional attention, PReLU."""
    return _dab()


@register
def dn_detr_r50() -> Config:
    """Single-scale DN-DETR: DAB-DETR trained with denoising queries."""
    return _dab(denoising=True)


def _tiny_dab(denoising: bool) -> Config:
    """DAB-/DN-DETR on a ResNet-18 with a 2+2-layer, 64-wide transformer (synthetic data)."""
    cfg = _dab("resnet18", denoising=denoising)
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward = 64, 4, 2, 2, 128
    cfg.model.queries.num_queries = 20
    cfg.model.num_classes = 4
    if denoising:
        cfg.model.denoising.dn_number = 3
    cfg.postprocess.num_select = 50
    return _tiny_data(cfg)


@register
def test_dab_detr_tiny() -> Config:
    return _tiny_dab(denoising=False)


@register
def test_dn_detr_tiny() -> Config:
    return _tiny_dab(denoising=True)


# ----------------------------------------------------------------------------- DAB / DN-Deformable DETR, DINO


def _dab_deformable(backbone: str = "resnet50", denoising: bool = False) -> Config:
    """DAB-Deformable-DETR (IDEA-Research/DAB-DETR ``-m dab_deformable_detr``): Deformable DETR
    with learned 4-D anchor boxes, anchor-conditioned (and content-scaled) positional queries
    and iterative anchor refinement; 50 epochs, drop after 40. ``denoising`` gives
    DN-Deformable-DETR (IDEA-Research/DN-DETR ``-m dn_dab_deformable_detr --use_dn``: 5 groups,
    label noise 0.2, box noise 0.4, content = 255-wide label embedding + indicator)."""
    cfg = _deformable(4, query_kind="anchors", box_update="refine", backbone=backbone)
    m, t = cfg.model, cfg.model.transformer
    t.dim_feedforward, t.dropout = 2048, 0.0
    t.decoder_query_scale = True
    if denoising:
        dn = m.denoising
        dn.kind, dn.dn_number, dn.label_noise_ratio, dn.box_noise_scale = "dn", 5, 0.2, 0.4
        dn.content_indicator = True
    cfg.loss.class_weight = 1.0
    tr = cfg.train
    tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult = 1e-4, 1e-5, 1.0
    return cfg


@register
def dab_deformable_detr_r50() -> Config:
    """DAB-Deformable-DETR, ResNet-50, 4 levels, 300 anchor queries."""
    return _dab_deformable()


@register
def dn_deformable_detr_r50() -> Config:
    """DN-Deformable-DETR, ResNet-50: DAB-Deformable-DETR trained with denoising queries."""
    return _dab_deformable(denoising=True)


def _dino(num_feature_levels: int = 4, backbone: str = "resnet50") -> Config:
    """DINO (Zhang et al., 2023; IDEA-Research/DINO ``config/DINO/DINO_4scale.py``): contrastive
    denoising (budget 100 queries, label noise 0.5, box noise 0.4), mixed query selection of
    900 anchors, look-forward-twice box refinement, shared decoder heads, 12 epochs."""
    cfg = _deformable(num_feature_levels, query_kind="mixed", box_update="look_forward_twice",
                      backbone=backbone)
    m, t = cfg.model, cfg.model.transformer
    if num_feature_levels == 5:
        m.backbone.levels = [1, 2, 3, 4]  # C2-C5 plus one strided level
    m.position.temperature_h = m.position.temperature_w = 20.0
    m.position.offset = 0.0
    t.dim_feedforward, t.dropout = 2048, 0.0
    t.decoder_norm = True
    m.queries.num_queries = 900
    m.heads.share_decoder_class = m.heads.share_decoder_box = True
    dn = m.denoising
    dn.kind, dn.dn_number, dn.label_noise_ratio, dn.box_noise_scale = "cdn", 100, 0.5, 0.4
    cfg.loss.class_weight = 1.0
    cfg.postprocess.num_select = 300
    tr = cfg.train
    tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult = 1e-4, 1e-5, 0.1
    tr.epochs, tr.lr_drop, tr.batch_size = 12, 11, 2
    return cfg


@register
def dino_4scale_r50() -> Config:
    """DINO-4scale, ResNet-50 (C3-C5 plus one strided level), 12-epoch schedule."""
    return _dino(4)


@register
def dino_5scale_r50() -> Config:
    """DINO-5scale, ResNet-50 (C2-C5 plus one strided level), 12-epoch schedule."""
    return _dino(5)


def _tiny_anchor(cfg: Config) -> Config:
    """ResNet-18, a 2+2-layer, 64-wide transformer, 30 queries, on the synthetic shapes."""
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward = 64, 4, 2, 2, 128
    cfg.model.queries.num_queries = 30  # 30 queries x 4 classes >= the 100 selected detections
    cfg.model.num_classes = 4
    cfg.postprocess.num_select = 100
    if cfg.model.denoising.kind != "none":
        cfg.model.denoising.dn_number = 3
    lr_mult = cfg.train.lr_linear_proj_mult
    cfg = _tiny_data(cfg)
    cfg.train.lr_linear_proj_mult = lr_mult
    return cfg


@register
def test_dab_deformable_detr_tiny() -> Config:
    return _tiny_anchor(_dab_deformable("resnet18"))


@register
def test_dn_deformable_detr_tiny() -> Config:
    return _tiny_anchor(_dab_deformable("resnet18", denoising=True))


@register
def test_dino_tiny() -> Config:
    return _tiny_anchor(_dino(4, "resnet18"))


@register
def test_dino_tiny_5scale() -> Config:
    return _tiny_anchor(_dino(5, "resnet18"))
