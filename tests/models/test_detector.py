"""The whole detector, for every preset: forward / backward on a padded batch, full-size
builds, end-to-end padding invariance, input checks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrkit.criterion import build_criterion
from detrkit.models import DetectionModel, build_model
from detrkit.models.backbone import interpolate_mask
from detrkit.presets import get_preset
from tests.conftest import FULL_PRESETS, TINY_PRESETS, random_targets

TINY = TINY_PRESETS
FULL = FULL_PRESETS


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_trains_one_step(name):
    """Forward with targets (denoising included), every loss term, backward: every trainable
    parameter gets a finite gradient; the frozen stem does not train."""
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).train()
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    targets = random_targets([2, 0], num_classes=cfg.model.num_classes)
    out = model(images, mask, targets)
    q = cfg.model.queries.num_queries * max(cfg.model.queries.num_patterns, 1)
    c = cfg.model.num_classes + (cfg.model.class_activation == "softmax")
    assert out.logits.shape == (2, q, c) and out.boxes.shape == (2, q, 4)
    assert len(out.aux) == cfg.model.transformer.dec_layers - 1
    assert (out.dn is not None) == (cfg.model.denoising.kind != "none")
    assert (out.enc is not None) == (cfg.model.queries.kind in ("two_stage", "mixed"))
    loss = build_criterion(cfg)(out, targets)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in grads)


@pytest.mark.parametrize("name", FULL)
def test_full_size_preset_builds(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    t = cfg.model.transformer
    assert model.num_classes == cfg.model.num_classes == 91
    assert len(model.transformer.encoder.layers) == t.enc_layers == 6
    assert len(model.transformer.decoder.layers) == t.dec_layers == 6
    assert model.neck.num_levels == t.num_feature_levels
    assert model.backbone.strides[-1] == (16 if cfg.model.backbone.dilation else 32)


class BlockBackbone(nn.Module):
    """Aligned 32x32 average pooling + 1x1 conv: a feature pixel sees only its own image block,
    so (unlike a ResNet, whose receptive field crosses the image border) it is padding-free."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, channels, 1)
        self.num_channels = [channels]

    def forward(self, images, mask):
        feats = self.proj(F.avg_pool2d(images, 32))
        return [feats], [interpolate_mask(mask, feats.shape[-2:])]


@pytest.mark.parametrize(
    "name,position",
    [("test_detr_tiny", "sine"), ("test_detr_tiny", "learned"), ("test_dab_detr_tiny", "sine")],
)
def test_padding_invariance_end_to_end(name, position):
    """The same image alone and padded inside a batch with a bigger one: same detections.
    (Not for a GroupNorm neck: its statistics include the padding, as in the official code.)"""
    torch.manual_seed(0)
    cfg = get_preset(name)
    cfg.model.position.kind = position
    model = build_model(cfg)
    model.backbone = BlockBackbone(model.neck.layers[0][0].in_channels)
    model.eval()
    small, big = torch.randn(3, 64, 96), torch.randn(3, 128, 160)
    batch = torch.zeros(2, 3, 128, 160)
    batch[0, :, :64, :96], batch[1] = small, big
    mask = torch.ones(2, 128, 160, dtype=torch.bool)
    mask[0, :64, :96] = False
    mask[1] = False
    with torch.no_grad():
        alone = model(small[None], torch.zeros(1, 64, 96, dtype=torch.bool))
        both = model(batch, mask)
    torch.testing.assert_close(both.logits[:1], alone.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.boxes[:1], alone.boxes, atol=1e-5, rtol=0)
    for a, b in zip(alone.aux, both.aux):
        torch.testing.assert_close(b.logits[:1], a.logits, atol=1e-4, rtol=0)


def test_aux_loss_off_and_attributes():
    cfg = get_preset("test_detr_tiny")
    cfg.model.aux_loss = False
    model = build_model(cfg).eval()
    assert isinstance(model, DetectionModel)
    assert (model.num_classes, model.class_activation) == (4, "softmax")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out.aux == []


def test_input_validation():
    model = build_model(get_preset("test_detr_tiny")).eval()
    with pytest.raises(ValueError, match="mask must be bool"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 64, dtype=torch.bool))
