"""Flattening levels and the encoder: valid ratios, reference points, padding, switches."""

import pytest
import torch

from detrkit.models.encoder import encoder_reference_points, flatten_levels, valid_ratio
from tests.conftest import levels_input, small_transformer

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]


def test_valid_ratio_and_encoder_reference_points():
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[:, :2, :6] = False
    torch.testing.assert_close(valid_ratio(mask), torch.tensor([[6 / 8, 2 / 4]]))
    # the same image (2 x 6) as level 0 and at half resolution (1 x 3) as level 1
    ref = encoder_reference_points([(4, 8), (2, 4)], torch.tensor([[[0.75, 0.5], [0.75, 0.5]]]))
    assert ref.shape == (1, 32 + 8, 2, 2)
    # pixel (0, 1) of level 0: centre x = 1.5 / 6 of the image -> 1.5 / 6 * 0.75 of the map
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([1.5 / 6 * 0.75, 0.5 / 2 * 0.5]))


def test_flatten_levels_adds_one_embedding_per_level():
    srcs, masks, pos = levels_input(SHAPES[:2], SHAPES[:2], batch=2)
    embed = torch.randn(2, 32)
    tokens, levels = flatten_levels(srcs, masks, pos, embed)
    assert tokens.shape == (2, 48 + 12, 32) and levels.padding.shape == (2, 60)
    assert levels.spatial_shapes == [(6, 8), (3, 4)]
    torch.testing.assert_close(levels.pos[:, 48], pos[1][:, :, 0, 0] + embed[1])
    torch.testing.assert_close(tokens[:, 5], srcs[0][:, :, 0, 5])
    _, plain = flatten_levels(srcs, masks, pos, None)
    torch.testing.assert_close(plain.pos[:, 48], pos[1][:, :, 0, 0])
    with pytest.raises(ValueError, match="feature levels"):
        flatten_levels(srcs, masks, pos, torch.randn(3, 32))


@pytest.mark.parametrize(
    "preset,shapes",
    [
        ("test_detr_tiny", SHAPES[:1]),
        ("test_deformable_detr_tiny", SHAPES),
        ("test_dab_detr_tiny", SHAPES[:1]),
    ],
)
def test_padding_does_not_leak_into_the_memory(preset, shapes):
    part = small_transformer(preset, "model.transformer.enc_layers=2")
    valid = [(max(1, h - 2), max(1, w - 3)) for h, w in shapes]
    srcs, masks, pos = levels_input(shapes, valid, batch=1)
    tokens, levels = flatten_levels(srcs, masks, pos, part.level_embed)
    garbage = tokens.clone()
    garbage[levels.padding] = 100.0
    with torch.no_grad():
        a, b = part.encoder(tokens, levels), part.encoder(garbage, levels)
    keep = ~levels.padding
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["test_detr_tiny", "test_deformable_detr_tiny"])
def test_pre_norm_adds_a_final_norm_with_either_attention(preset):
    post = small_transformer(preset)
    pre = small_transformer(preset, "model.transformer.pre_norm=true")
    assert post.encoder.norm is None and pre.encoder.norm is not None
    srcs, masks, pos = levels_input(SHAPES[: post.num_levels], SHAPES[: post.num_levels])
    tokens, levels = flatten_levels(srcs, masks, pos, post.level_embed)
    pre.load_state_dict(post.state_dict(), strict=False)  # the same layer weights
    with torch.no_grad():
        out = pre.encoder(tokens, levels)
        norm, pre.encoder.norm = pre.encoder.norm, None
        raw = pre.encoder(tokens, levels)
        post_out = post.encoder(tokens, levels)
    torch.testing.assert_close(out, norm(raw))  # the final norm comes last
    assert not torch.allclose(raw, post_out, atol=1e-3)  # and the layers normalise first


@pytest.mark.parametrize("preset", ["test_detr_tiny", "test_deformable_detr_tiny"])
def test_encoder_query_scale_rescales_the_position_of_every_layer(preset):
    part = small_transformer(preset, "model.transformer.encoder_query_scale=true")
    scale = part.encoder.query_scale
    srcs, masks, pos = levels_input(SHAPES[: part.num_levels], SHAPES[: part.num_levels])
    tokens, levels = flatten_levels(srcs, masks, pos, part.level_embed)
    with torch.no_grad():
        scaled = part.encoder(tokens, levels)
        last = scale.layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)  # query_scale(x) == 1: the plain encoder
        unit = part.encoder(tokens, levels)
        part.encoder.query_scale = None
        plain = part.encoder(tokens, levels)
    torch.testing.assert_close(unit, plain)
    assert not torch.allclose(scaled, plain)
