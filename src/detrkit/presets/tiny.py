"""Tiny variants of every family (``test_*``): a ResNet-18, a 2+2-layer, 64-wide transformer
and few queries, on the synthetic shapes data. They build and train in seconds on a CPU; the
test suite and the demo use them."""

from __future__ import annotations

from detrkit.config import Config
from detrkit.presets.dab import dab, dab_deformable
from detrkit.presets.deformable import deformable
from detrkit.presets.detr import detr
from detrkit.presets.dino import dino
from detrkit.presets.registry import register

__all__ = ["tiny"]


def tiny(cfg: Config, num_queries: int, num_select: int | None) -> Config:
    """Shrink ``cfg``: ResNet-18 (set by the caller), 64-wide 2+2 layers, 4 classes, small
    synthetic images and a short schedule."""
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward = 64, 4, 2, 2, 128
    t.dropout = 0.0
    cfg.model.queries.num_queries = num_queries
    cfg.model.num_classes = 4
    cfg.postprocess.num_select = num_select
    if cfg.model.denoising.kind != "none":
        cfg.model.denoising.dn_number = 3
    d = cfg.data
    d.format = "synthetic"
    d.synthetic.image_size = 128
    d.augment.train_scales = [112, 128, 144]
    d.augment.max_size = 192
    d.augment.crop = False
    d.augment.val_scale = 128
    tr = cfg.train
    tr.batch_size, tr.epochs, tr.lr_drop = 8, 6, 5
    tr.lr, tr.lr_backbone = 2e-4, 2e-5
    return cfg


@register
def test_detr_tiny() -> Config:
    return tiny(detr("resnet18"), 20, None)


# 30 queries x 4 classes >= the 100 selected detections of the Deformable-style models
@register
def test_deformable_detr_tiny() -> Config:
    return tiny(deformable(backbone="resnet18"), 30, 100)


@register
def test_deformable_detr_tiny_single_scale() -> Config:
    return tiny(deformable(1, backbone="resnet18"), 30, 100)


@register
def test_deformable_detr_tiny_refine() -> Config:
    return tiny(deformable(box_update="refine", backbone="resnet18"), 30, 100)


@register
def test_deformable_detr_tiny_two_stage() -> Config:
    return tiny(
        deformable(query_kind="two_stage", box_update="refine", backbone="resnet18"), 30, 100
    )


@register
def test_dab_detr_tiny() -> Config:
    return tiny(dab("resnet18"), 20, 50)


@register
def test_dn_detr_tiny() -> Config:
    return tiny(dab("resnet18", denoising=True), 20, 50)


@register
def test_dab_deformable_detr_tiny() -> Config:
    return tiny(dab_deformable("resnet18"), 30, 100)


@register
def test_dn_deformable_detr_tiny() -> Config:
    return tiny(dab_deformable("resnet18", denoising=True), 30, 100)


@register
def test_dino_tiny() -> Config:
    return tiny(dino(4, "resnet18"), 30, 100)


@register
def test_dino_tiny_5scale() -> Config:
    return tiny(dino(5, "resnet18"), 30, 100)
