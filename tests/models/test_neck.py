import pytest
import torch

from detrkit.models.neck import ConvProjection, MultiLevelProjection


def test_conv_projection_uses_last_level():
    neck = ConvProjection(16, 32)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    masks = [torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool)]
    srcs, out_masks = neck(feats, masks, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert len(srcs) == 1 and srcs[0].shape == (2, 32, 4, 4) and out_masks[0] is masks[1]
    assert set(neck.state_dict()) == {"proj.weight", "proj.bias"}


def test_multi_level_extra_levels():
    neck = MultiLevelProjection([8, 16, 32], hidden_dim=64, num_levels=5)
    image_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    image_mask[:, :, 32:] = True
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2)]
    masks = [torch.zeros(1, s, s, dtype=torch.bool) for s in (8, 4, 2)]
    srcs, out_masks = neck(feats, masks, image_mask)
    assert [tuple(s.shape) for s in srcs] == [(1, 64, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2),
                                             (1, 64, 1, 1), (1, 64, 1, 1)]
    assert len(out_masks) == 5 and out_masks[3].shape == (1, 1, 1)
    # first extra level reads the raw backbone map (32 ch), the next the projected one (64 ch)
    assert neck.layers[3][0].in_channels == 32 and neck.layers[4][0].in_channels == 64
    assert neck.layers[3][0].stride == (2, 2) and neck.layers[3][0].kernel_size == (3, 3)
    assert {k.rsplit(".", 1)[0] for k in neck.state_dict()} == {
        f"layers.{i}.{j}" for i in range(5) for j in (0, 1)}


def test_multi_level_extra_mask_follows_image_mask():
    neck = MultiLevelProjection([32], hidden_dim=32, num_levels=2)
    image_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    image_mask[:, 32:, :] = True
    srcs, masks = neck([torch.randn(1, 32, 4, 4)], [torch.zeros(1, 4, 4, dtype=torch.bool)],
                       image_mask)
    assert masks[1].tolist() == [[[False, False], [True, True]]]


def test_multi_level_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 32"):
        MultiLevelProjection([8], hidden_dim=48, num_levels=1)
