"""explain(): the trajectory, the proposals, the denoising view and what does not apply."""

from __future__ import annotations

import pytest
import torch

from detrkit.explain import PICTURES, explain
from detrkit.structures import Target
from tests.explain._support import DENOISING, PRESETS, detector, explained, image


@pytest.mark.parametrize("preset", PRESETS)
def test_the_trajectory_ends_in_the_model_output_and_follows_the_box_update(preset):
    det, result = detector(preset), explained(preset)
    t = result.trajectory
    layers, q = (
        len(det.model.transformer.decoder.layers),
        det.model.transformer.queries.num_matching,
    )
    assert t.boxes.shape == (layers, q, 4)
    assert torch.equal(t.boxes[-1], result.output.boxes[0])
    for i, aux in enumerate(result.output.aux):
        assert torch.equal(t.boxes[i], aux.boxes[0])
    if t.box_update == "none":
        assert t.initial is None or t.initial.shape[-1] == 2
    else:  # refine / look forward twice: layer i starts from layer i-1's box
        assert t.initial is not None and t.initial.shape == (q, 4)
        assert not torch.equal(t.boxes[0], t.initial)  # the first layer moved the boxes
    assert result.top_queries.shape == (3,)
    assert bool((result.scores[:-1] >= result.scores[1:]).all())


@pytest.mark.parametrize("preset", ["test_deformable_detr_tiny_two_stage", "test_dino_tiny"])
def test_the_proposals_are_the_decoders_start_and_the_top_ranked_tokens(preset):
    result = explained(preset)
    p = result.proposals
    q = detector(preset).model.transformer.queries.num_queries
    assert p is not None and p.boxes.shape == (q, 4) and p.anchors.shape == (q, 4)
    assert torch.equal(p.boxes, result.trajectory.initial)  # the decoder starts from them
    assert bool(((p.token_index >= 0) & (p.token_index < p.num_tokens)).all())
    assert len(set(p.token_index.tolist())) == q  # q distinct tokens
    # each anchor is 0.05 * 2**level wide (the encoder's proposal grid)
    torch.testing.assert_close(p.anchors[:, 2], 0.05 * 2.0 ** p.level.float())
    enc = result.output.enc
    if p.kind == "two_stage":  # the q best objectness logits over every valid token
        objectness = enc.logits[0, :, 0].masked_fill((enc.anchors[0] == 1).all(-1), float("-inf"))
        torch.testing.assert_close(p.scores.sort(descending=True).values, objectness.topk(q).values)
    else:
        torch.testing.assert_close(p.scores, enc.logits[0].max(-1).values)


@pytest.mark.parametrize("preset", DENOISING)
def test_the_denoising_mask_matches_the_groups(preset):
    det = detector(preset)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]])
    gt = Target(boxes, torch.tensor([1, 3]))
    result = explain(det.model, det.config, image(), top_k=2, targets=gt, seed=1)
    dn = result.denoising
    meta, mask = dn.meta, dn.attn_mask
    q = det.model.transformer.queries.num_matching
    copies = 2 if meta.kind == "cdn" else 1
    assert dn.source == "given" and torch.equal(dn.gt_boxes, boxes)
    assert meta.group_size == 2 * copies and meta.pad_size == meta.num_groups * meta.group_size
    assert dn.noised_boxes.shape == (meta.num_groups * copies * 2, 4)
    assert int(dn.negative.sum()) == (meta.num_groups * 2 if copies == 2 else 0)
    assert mask.shape == (meta.pad_size + q, meta.pad_size + q)
    p = meta.pad_size
    group = torch.arange(p) // meta.group_size
    assert torch.equal(mask[:p, :p], group[:, None] != group[None, :])  # only its own group
    assert bool(mask[p:, :p].all())  # matching queries never see a denoising query
    assert not bool(mask[:, p:].any())  # everyone sees the matching queries
    assert dn.reconstructed.shape == (p, 4)
    # each copy sits in its group's slot of its target; positives are noised copies of it
    assert torch.equal(dn.group, dn.slot_index // meta.group_size)
    pos = ~dn.negative
    err = (dn.noised_boxes[pos] - boxes[dn.target_index[pos]]).abs()
    assert bool((err <= boxes[dn.target_index[pos]][:, 2:].repeat(1, 2) + 1e-6).all())


def test_without_an_annotation_the_groups_surround_the_top_predictions():
    result = explained("test_dino_tiny")
    dn = result.denoising
    assert dn.source == "predictions"
    assert torch.equal(dn.gt_boxes, result.output.boxes[0, result.top_queries])


def test_pictures_that_do_not_apply_are_listed_with_a_reason():
    detr = {s.picture: s.reason for s in explained("test_detr_tiny").skipped}
    assert set(detr) == {
        "decoder_sampling",
        "encoder_sampling",
        "proposals",
        "denoising_groups",
        "denoising_mask",
    }
    assert "global" in detr["decoder_sampling"] and "learned" in detr["proposals"]
    assert "denoising" in detr["denoising_mask"]
    dino = {s.picture for s in explained("test_dino_tiny").skipped}
    assert dino == {"cross_attention", "encoder_attention"}
    assert set(PICTURES) >= dino | set(detr)


def test_a_pixel_outside_the_image_is_one_clear_error():
    det = detector("test_detr_tiny")
    with pytest.raises(ValueError, match="pixel"):
        explain(det.model, det.config, image(), pixel=(500.0, 10.0))
