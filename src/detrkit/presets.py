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
