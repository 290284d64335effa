"""Prediction heads: sharing, encoder heads, and the official initialisation."""

import math

import pytest
import torch

from detrkit.models.heads import Heads, prior_prob_bias
from tests.conftest import small_transformer


def test_prior_bias():
    assert 1 / (1 + math.exp(-prior_prob_bias(0.01))) == pytest.approx(0.01)


def test_initialisation_follows_the_official_code():
    heads = Heads(
        32,
        3,
        4,
        share_class=False,
        share_box=False,
        own_encoder=(True, True),
        sigmoid=True,
        relative=True,
        small_first_box=True,
        eps=1e-5,
    )
    torch.testing.assert_close(heads.class_embed[0].bias, torch.full((3,), prior_prob_bias()))
    assert heads.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert heads.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert heads.bbox_embed[1].layers[-1].bias.tolist() == [0, 0, 0, 0]
    # per-layer heads start as copies of one head (but are separate parameters)
    assert torch.equal(heads.class_embed[0].weight, heads.class_embed[3].weight)
    assert heads.class_embed[0].weight is not heads.class_embed[3].weight
    assert torch.equal(heads.enc_class_embed.weight, heads.class_embed[0].weight)
    softmax = Heads(
        32,
        4,
        2,
        True,
        True,
        (False, False),
        sigmoid=False,
        relative=False,
        small_first_box=False,
        eps=1e-5,
    )
    assert softmax.bbox_embed[0].layers[-1].weight.abs().sum() > 0  # DETR: no zero start
    assert not torch.allclose(softmax.class_embed[0].bias, torch.full((4,), prior_prob_bias()))


def test_sharing_and_encoder_heads():
    shared = Heads(32, 3, 4, True, True, (False, True), True, True, False, 1e-3)
    assert len(shared.class_embed) == len(shared.bbox_embed) == 1
    assert shared.layer(3)[0] is shared.class_embed[0]
    assert shared.box_heads() == [shared.bbox_embed[0]] * 4
    cls, box = shared.encoder()
    assert cls is shared.class_embed[0] and box is shared.enc_bbox_embed


@pytest.mark.parametrize(
    "preset,enc",
    [
        ("test_deformable_detr_tiny_two_stage", (True, True)),  # refine: own encoder heads
        ("test_dino_tiny", (True, True)),  # DINO: shared decoder heads, own encoder heads
    ],
)
def test_presets_encoder_heads(preset, enc):
    part = small_transformer(preset)
    assert (part.heads.enc_class_embed is not None, part.heads.enc_bbox_embed is not None) == enc
    no_refine = small_transformer(
        preset,
        "model.queries.box_update=none",
        "model.heads.share_decoder_class=true",
        "model.heads.share_decoder_box=true",
        "model.heads.share_encoder_class=true",
        "model.heads.share_encoder_box=true",
    )
    # the official two-stage without refinement uses its one shared head for the proposals
    assert no_refine.heads.enc_class_embed is None and no_refine.heads.enc_bbox_embed is None
