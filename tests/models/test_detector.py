import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrkit.models import Detector, build_model
from detrkit.models.backbone import interpolate_mask
from detrkit.presets import get_preset, list_presets

GLOBAL_PRESETS = [p for p in list_presets()
                  if get_preset(p).model.transformer.attention == "global"]


def _build(name):
    try:
        return build_model(get_preset(name))
    except NotImplementedError as err:  # a global-attention variant whose part is not written yet
        pytest.xfail(str(err))


@pytest.mark.parametrize("name", [p for p in GLOBAL_PRESETS if p.startswith("test_")])
def test_tiny_preset_forward_backward(name):
    torch.manual_seed(0)
    model = _build(name).train()
    cfg = get_preset(name)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    out = model(images, mask)
    q, c = cfg.model.queries.num_queries, model.num_classes
    c += model.class_activation == "softmax"
    assert out.logits.shape == (2, q, c) and out.boxes.shape == (2, q, 4)
    assert len(out.aux) == cfg.model.transformer.dec_layers - 1
    loss = out.logits.sum() + out.boxes.sum() + sum(a.logits.sum() + a.boxes.sum() for a in out.aux)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("backbone.body.layer4") for n in grads)
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in grads)


@pytest.mark.parametrize("name", [p for p in GLOBAL_PRESETS if not p.startswith("test_")
                                  and get_preset(p).model.queries.kind == "learned"])
def test_full_size_detr_preset_builds(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = _build(name)
    assert model.num_classes == cfg.model.num_classes == 91
    assert model.transformer.query_embed.weight.shape == (cfg.model.queries.num_queries,
                                                           cfg.model.transformer.hidden_dim)
    assert model.transformer.class_embed.out_features == 92
    assert len(model.transformer.encoder.layers) == cfg.model.transformer.enc_layers
    assert model.backbone.strides == [16 if cfg.model.backbone.dilation else 32]


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


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_padding_invariance(position):
    """Same image alone and padded inside a batch with a bigger one: same detections."""
    torch.manual_seed(0)
    cfg = get_preset("test_detr_tiny")
    cfg.model.position.kind = position
    model = build_model(cfg)
    model.backbone = BlockBackbone(model.neck.proj.in_channels)
    model.eval()
    small = torch.randn(3, 64, 96)
    big = torch.randn(3, 128, 160)
    batch = torch.zeros(2, 3, 128, 160)
    batch[0, :, :64, :96] = small
    batch[1] = big
    mask = torch.ones(2, 128, 160, dtype=torch.bool)
    mask[0, :64, :96] = False
    mask[1] = False
    with torch.no_grad():
        alone = model(small[None], torch.zeros(1, 64, 96, dtype=torch.bool))
        both = model(batch, mask)
    torch.testing.assert_close(both.logits[:1], alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(both.boxes[:1], alone.boxes, atol=1e-5, rtol=0)
    for a, b in zip(alone.aux, both.aux):
        torch.testing.assert_close(b.logits[:1], a.logits, atol=1e-5, rtol=0)


def test_aux_loss_off_and_attributes():
    cfg = get_preset("test_detr_tiny")
    cfg.model.aux_loss = False
    model = build_model(cfg).eval()
    assert isinstance(model, Detector)
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


def test_deformable_branch_is_explicit():
    cfg = get_preset("test_detr_tiny")
    cfg.model.transformer.attention = "deformable"
    cfg.model.transformer.num_feature_levels = 4
    cfg.model.queries.kind = "reference_points"
    cfg.model.class_activation = "sigmoid"
    cfg.loss.class_loss = "focal"
    try:
        model = build_model(cfg)
    except NotImplementedError as err:
        assert "deformable" in str(err)
    else:  # once the deformable part is plugged in, it must use the multi-level neck
        assert model.neck.num_levels == 4
