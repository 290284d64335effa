import urllib.error

import pytest
import torch
from torch import nn

from detrkit.models.backbone import FrozenBatchNorm2d, ResNetBackbone, interpolate_mask


def test_frozen_batchnorm_matches_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 3)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, not an error
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-5)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_frozen_batchnorm_does_not_update_in_train_mode():
    frozen = FrozenBatchNorm2d(3).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(torch.randn(4, 3, 8, 8) * 5 + 3)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("frozen_stages", [0, 1, 2])
def test_frozen_stages(frozen_stages):
    bb = ResNetBackbone("resnet18", frozen_stages=frozen_stages)
    trainable = {n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad}
    stages = ["layer1", "layer2", "layer3", "layer4"]
    expected = set(stages[frozen_stages:]) | ({"conv1"} if frozen_stages == 0 else set())
    assert trainable == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())


def test_trainable_batchnorm_learns_and_frozen_stages_keep_their_statistics():
    bb = ResNetBackbone("resnet18", frozen_stages=1, norm="bn").train()
    bns = {n: m for n, m in bb.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns and not any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert bns["body.layer2.0.bn1"].weight.requires_grad
    assert not bns["body.layer1.0.bn1"].weight.requires_grad
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    images = torch.randn(2, 3, 64, 64) * 3 + 1
    bb(images, torch.zeros(2, 64, 64, dtype=torch.bool))
    moved = {n for n, m in bns.items() if not torch.equal(m.running_mean, before[n])}
    assert moved and all(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in moved)
    # eval mode uses the running statistics: a single image gives the same as in a batch
    bb.eval()
    one = bb(images[:1], torch.zeros(1, 64, 64, dtype=torch.bool))[0][-1]
    two = bb(images, torch.zeros(2, 64, 64, dtype=torch.bool))[0][-1]
    # the convolutions may pick another algorithm for another batch size: float32 noise
    torch.testing.assert_close(one, two[:1], atol=1e-4, rtol=1e-4)


def test_backbone_norm_is_checked_when_the_config_loads():
    from detrkit.config import ConfigError, apply_overrides
    from detrkit.presets import get_preset

    cfg = apply_overrides(get_preset("test_detr_tiny"), ["model.backbone.norm=bn"])
    assert cfg.model.backbone.norm == "bn"
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        apply_overrides(get_preset("test_detr_tiny"), ["model.backbone.norm=batchnorm"])


def test_levels_strides_and_masks():
    bb = ResNetBackbone("resnet18", return_levels=[2, 3, 4]).eval()
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 64:] = True  # second image is 96 x 64
    feats, masks = bb(images, mask)
    assert [f.shape[1] for f in feats] == bb.num_channels == [128, 256, 512]
    assert [f.shape[-2:] for f in feats] == [(12, 16), (6, 8), (3, 4)]
    assert bb.strides == [8, 16, 32]
    for f, m in zip(feats, masks):
        assert m.dtype == torch.bool and m.shape == (2, *f.shape[-2:])
        assert not m[0].any()
        w = f.shape[-1]
        assert m[1, :, : w // 2].logical_not().all() and m[1, :, w // 2 :].all()


def test_dilation_keeps_stride_16():
    bb = ResNetBackbone("resnet50", dilation=True).eval()
    feats, _ = bb(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert feats[0].shape == (1, 2048, 4, 4) and bb.strides == [16]


def test_dilation_with_basic_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="dilation"):
        ResNetBackbone("resnet18", dilation=True)


def test_pretrained_offline_error(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pretrained.*could not download"):
        ResNetBackbone("resnet18", pretrained=True)


def test_interpolate_mask_nearest():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, 4:, :] = True
    small = interpolate_mask(mask, (2, 2))
    assert small.tolist() == [[[False, False], [True, True]]]
