"""Denoising groups: layout, noise, attention mask (the official reproduction is in
tests/parity)."""

import pytest
import torch

from detrkit.models.denoising import (
    build_denoising_groups,
    cdn_num_groups,
    denoising_attention_mask,
    embed_denoising_queries,
    noise_boxes_cdn,
    noise_boxes_dn,
    noise_labels,
    prepare_denoising,
    split_denoising,
)
from detrkit.structures import Target
from tests.conftest import random_targets


def _targets(counts, seed=0):
    return random_targets(counts, num_classes=5, seed=seed)


def test_uneven_counts_and_an_image_without_boxes():
    targets = _targets([0, 1, 7])
    groups = build_denoising_groups(targets, "dn", 3, 0.0, 0.0, 5)
    meta = groups.meta
    assert (meta.pad_size, meta.group_size, meta.num_groups) == (21, 7, 3)
    assert meta.num_targets == [0, 1, 7] and meta.num_entries == 3 * 8
    emb = torch.nn.Embedding(6, 7)
    content, boxes = embed_denoising_queries(groups, emb, 3, indicator=True)
    assert content.shape == (3, 21, 8) and boxes.shape == (3, 21, 4)
    assert not content[0].any() and not boxes[0].any()  # image without boxes: padding only
    used = content[..., -1] == 1  # indicator marks the real slots
    assert used[1].nonzero().view(-1).tolist() == [0, 7, 14]
    assert used[2].all()
    for g in range(3):  # group g holds target j of image 2 at slot 7g + j
        torch.testing.assert_close(boxes[2, 7 * g : 7 * g + 7].sigmoid(), targets[2].boxes)
        torch.testing.assert_close(content[2, 7 * g : 7 * g + 7, :-1], emb(targets[2].labels))


def test_batch_without_boxes_gives_no_queries():
    for kind in ("dn", "cdn"):
        q = prepare_denoising(
            _targets([0, 0]),
            torch.nn.Embedding(6, 8),
            10,
            kind,
            5,
            0.5,
            0.4,
            5,
            indicator=kind == "dn",
        )
        assert q.pad_size == 0 and q.attn_mask is None
        assert q.content.shape == (2, 0, 8 + (kind == "dn")) and q.boxes_unact.shape == (2, 0, 4)
        assert q.meta.num_entries == 0 and q.meta.num_targets == [0, 0]


def test_cdn_groups_follow_the_budget():
    assert cdn_num_groups(100, 3) == 33  # official default budget: 100 // max targets
    assert cdn_num_groups(100, 250) == 1  # more boxes than the budget: still one group
    assert cdn_num_groups(6, 3) == 12  # small budgets: 2 * dn_number groups (official rule)
    assert cdn_num_groups(100, 0) == 1
    groups = build_denoising_groups(_targets([150, 2]), "cdn", 100, 0.5, 0.4, 5)
    meta = groups.meta
    assert (meta.num_groups, meta.group_size, meta.pad_size) == (1, 300, 300)
    assert groups.labels.shape[0] == 2 * 152 and meta.num_entries == 152
    negative_slots = groups.slot_index[152:]  # second copy of every target: negatives
    assert torch.equal(negative_slots, groups.slot_index[:152] + 150)


def test_attention_mask_blocks_other_groups_and_hides_groups_from_matching():
    mask = denoising_attention_mask(pad_size=6, group_size=2, num_queries=3)
    expected = torch.ones(9, 9, dtype=torch.bool)
    for g in range(3):
        expected[2 * g : 2 * g + 2, 2 * g : 2 * g + 2] = False
    expected[:, 6:] = False  # everybody sees the matching queries
    assert torch.equal(mask, expected)
    assert not denoising_attention_mask(0, 0, 4).any()


def test_label_noise():
    labels = torch.arange(5).repeat(200)
    assert torch.equal(noise_labels(labels, 0.0, 5), labels)
    g = torch.Generator().manual_seed(0)
    noised = noise_labels(labels, 1.0, 5, generator=g)
    assert noised.min() >= 0 and noised.max() < 5
    changed = (noised != labels).float().mean().item()
    assert 0.7 < changed < 0.9  # every label redrawn; 1/5 land on their old value
    g = torch.Generator().manual_seed(0)
    some = (noise_labels(labels, 0.2, 5, generator=g) != labels).float().mean().item()
    assert 0.1 < some < 0.25


def test_dn_box_noise_stays_within_its_range():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)
    noised = noise_boxes_dn(boxes, 0.4, generator=g)
    shift = (noised - boxes).abs()
    assert (shift[:, 0] <= 0.4 * 0.1 + 1e-6).all() and (shift[:, 1] <= 0.4 * 0.2 + 1e-6).all()
    assert (shift[:, 2] <= 0.4 * 0.2 + 1e-6).all() and (shift[:, 3] <= 0.4 * 0.4 + 1e-6).all()
    assert shift[:, 0].max() > 0.035  # the range is used
    assert torch.equal(noise_boxes_dn(boxes, 0.0), boxes)


def test_cdn_negatives_are_further_than_positives():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(1000, 1)
    negative = torch.arange(1000) % 2 == 1
    noised = noise_boxes_cdn(boxes, 0.4, negative, generator=g)

    def corners(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)

    move = (corners(noised) - corners(boxes)).abs() / (0.4 * 0.1)  # in units of scale*w/2
    assert (move[~negative] <= 1 + 1e-4).all()
    assert (move[negative] >= 1 - 1e-4).all() and (move[negative] <= 2 + 1e-4).all()


def test_labels_out_of_range_are_refused():
    bad = [Target(boxes=torch.tensor([[0.5, 0.5, 0.1, 0.1]]), labels=torch.tensor([5]))]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        build_denoising_groups(bad, "dn", 2, 0.2, 0.4, 5)


def test_split():
    x = torch.arange(2 * 3 * 7).view(2, 3, 7, 1)
    dn, match = split_denoising(x, 4)
    assert torch.equal(dn, x[:, :, :4]) and torch.equal(match, x[:, :, 4:])
