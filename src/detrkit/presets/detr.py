"""DETR (Carion et al., 2020) at the facebookresearch/detr defaults (300-epoch schedule):
global attention on C5, learned queries, softmax classes, one shared head."""

from __future__ import annotations

from detrkit.config import Config
from detrkit.presets.registry import register

__all__ = ["detr"]


def detr(backbone: str = "resnet50", dilation: bool = False) -> Config:
    """The DETR recipe; ``Config()``'s defaults are DETR's."""
    cfg = Config()
    cfg.model.backbone.name = backbone  # type: ignore[assignment]
    cfg.model.backbone.dilation = dilation
    cfg.train.epochs = 300
    cfg.train.lr_drop = 200
    return cfg


@register
def detr_r50() -> Config:
    return detr("resnet50")


@register
def detr_r50_dc5() -> Config:
    return detr("resnet50", dilation=True)


@register
def detr_r101() -> Config:
    return detr("resnet101")


@register
def detr_r101_dc5() -> Config:
    return detr("resnet101", dilation=True)
