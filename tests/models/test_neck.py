"""The neck: 1x1 projections of the backbone levels, strided extra levels, optional GroupNorm."""

import pytest
import torch
from torch import nn

from detrkit.models import FeatureProjection


def _features(batch=2):
    feats = [torch.randn(batch, 8, 16, 16), torch.randn(batch, 16, 8, 8)]
    masks = [
        torch.zeros(batch, 16, 16, dtype=torch.bool),
        torch.zeros(batch, 8, 8, dtype=torch.bool),
    ]
    return feats, masks


@pytest.mark.parametrize("norm", ["group_norm", "none"])
def test_levels_and_extra_levels(norm):
    neck = FeatureProjection([8, 16], 32, num_levels=4, norm=norm)
    feats, masks = _features()
    srcs, out_masks = neck(feats, masks, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert [tuple(s.shape) for s in srcs] == [
        (2, 32, 16, 16),
        (2, 32, 8, 8),
        (2, 32, 4, 4),
        (2, 32, 2, 2),
    ]
    assert [tuple(m.shape) for m in out_masks] == [(2, 16, 16), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    # the first extra level convolves the last backbone map, the next one the previous level
    assert neck.layers[2][0].in_channels == 16 and neck.layers[3][0].in_channels == 32
    has_norm = [any(isinstance(m, nn.GroupNorm) for m in layer) for layer in neck.layers]
    assert has_norm == [norm == "group_norm"] * 4
    keys = set(neck.state_dict())
    assert ("layers.0.1.weight" in keys) == (norm == "group_norm") and "layers.0.0.weight" in keys


def test_single_level_uses_the_last_backbone_map():
    neck = FeatureProjection([16], 32, num_levels=1, norm="none")
    feats, masks = _features()
    srcs, out_masks = neck(feats[1:], masks[1:], torch.zeros(2, 64, 64, dtype=torch.bool))
    assert len(srcs) == 1 and srcs[0].shape == (2, 32, 8, 8) and out_masks[0] is masks[1]
    expected = nn.functional.conv2d(feats[1], neck.layers[0][0].weight, neck.layers[0][0].bias)
    torch.testing.assert_close(srcs[0], expected)


def test_extra_level_mask_follows_the_image_mask():
    neck = FeatureProjection([8, 16], 32, num_levels=3)
    feats, masks = _features(batch=1)
    image_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    image_mask[:, :, 32:] = True  # right half is padding
    _, out_masks = neck(feats, masks, image_mask)
    assert out_masks[2][0, :, :2].logical_not().all() and out_masks[2][0, :, 2:].all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_levels"):
        FeatureProjection([8, 16], 32, num_levels=1)
    neck = FeatureProjection([8, 16], 32, num_levels=2)
    with pytest.raises(ValueError, match="backbone levels"):
        neck(_features()[0][:1], _features()[1][:1], torch.zeros(2, 64, 64, dtype=torch.bool))
