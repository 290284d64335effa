"""Query initialisation: learned embeddings, anchors, patterns, encoder proposals and their
selection, and every kind of content."""

import pytest
import torch
from torch import nn

from detrkit.models.encoder import flatten_levels
from detrkit.models.queries import QueryInitialiser, encoder_proposals
from tests.conftest import levels_input, small_transformer

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]


def test_encoder_proposals_anchor_sizes_and_invalid_tokens():
    shapes = [(4, 4), (2, 2)]
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # the image covers 3 of 4 columns
    mask1 = torch.tensor([[[False, True], [False, True]]])  # 1 of 2 columns at level 1
    padding = torch.cat([mask.flatten(1), mask1.flatten(1)], 1)  # [1, 20]
    proposals, invalid = encoder_proposals(padding, shapes)
    boxes = proposals.sigmoid()[0]
    # centres relative to the valid part, size 0.05 * 2**level
    torch.testing.assert_close(boxes[1], torch.tensor([1.5 / 3, 0.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(boxes[16], torch.tensor([0.5, 0.25, 0.1, 0.1]))
    assert torch.equal(invalid, padding) and proposals[padding].isinf().all()
    # anchors too close to the border are invalid too
    _, invalid = encoder_proposals(torch.zeros(1, 80 * 80, dtype=torch.bool), [(80, 80)])
    assert invalid[0, 0] and not invalid[0, 81]


class _Fixed(nn.Module):
    """A head that ignores its input and returns ``value`` ``[1, S, k]``."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value.expand(x.shape[0], -1, -1)


class _Heads:
    def __init__(self, logits, deltas):
        self._pair = (_Fixed(logits), _Fixed(deltas))

    def encoder(self):
        return self._pair


def _selection_input():
    """Five tokens on one 1x5 level; tokens 3 and 4 are padding (the image is on the left)."""
    mask = torch.tensor([[[False, False, False, True, True]]])
    srcs, _, pos = levels_input([(1, 5)], [(1, 5)], d=8)
    _, levels = flatten_levels(srcs, [mask], pos, None)
    return torch.randn(1, 5, 8), levels


@pytest.mark.parametrize(
    "kind,valid_only,picked",
    [
        ("two_stage", True, [0, 2]),
        ("two_stage", False, [0, 4]),
        ("mixed", True, [0, 1]),
        ("mixed", False, [0, 4]),
    ],
)
def test_selection_ranks_by_objectness_or_best_class(kind, valid_only, picked):
    memory, levels = _selection_input()
    # class 0 ranks 0 > 4 > 2 > 3 > 1; the best class ranks 0 > 4 > 1 > 3 > 2
    logits = torch.tensor([[[9.0, 0.0], [1.0, 8.5], [3.0, 0.0], [2.0, 4.0], [8.0, 8.8]]])
    deltas = torch.zeros(1, 5, 4)
    init = QueryInitialiser(kind, "learned", 8, num_queries=2, select_valid_proposals=valid_only)
    out = init(memory, levels, _Heads(logits, deltas))
    proposals, _ = encoder_proposals(levels.padding, levels.spatial_shapes)
    expected = proposals[0, picked].sigmoid()
    assert (expected[:, 0] < 1).sum() == 1 + valid_only  # invalid tokens have boxes of 1.0
    torch.testing.assert_close(out.reference[0], expected)
    assert not out.reference.requires_grad
    assert (out.pos is None) == (kind == "mixed")
    if kind == "two_stage":  # every token is supervised
        assert out.enc.logits.shape == (1, 5, 2) and (out.enc.boxes[0, [3, 4]] == 1.0).all()
    else:  # the selected ones
        torch.testing.assert_close(out.enc.logits[0], logits[0, picked])
        torch.testing.assert_close(out.enc.anchors[0], expected)
    with pytest.raises(ValueError, match="num_queries=6"):
        QueryInitialiser(kind, "learned", 8, num_queries=6)(memory, levels, _Heads(logits, deltas))


@pytest.mark.parametrize("content", ["learned", "encoder", "proposal", "zero"])
def test_mixed_content_kinds(content):
    part = small_transformer("test_dino_tiny", f"model.queries.content={content}")
    srcs, masks, pos = levels_input(SHAPES, SHAPES)
    tokens, levels = flatten_levels(srcs, masks, pos, part.level_embed)
    memory = part.encoder(tokens, levels).detach().requires_grad_()
    q = part.queries(memory, levels, part.heads)
    assert q.content.shape == (1, 8, 32) and q.selected.shape == (1, 8, 32)
    if content == "learned":
        torch.testing.assert_close(q.content[0], part.queries.content.weight)
    elif content == "encoder":
        torch.testing.assert_close(q.content, q.selected)
        assert not q.content.requires_grad and q.selected.requires_grad
    elif content == "proposal":
        assert part.queries.pos_trans.out_features == 32 and q.content.requires_grad
    else:
        assert (q.content == 0).all()


def test_two_stage_positions_and_proposal_content_come_from_one_projection():
    part = small_transformer("test_deformable_detr_tiny_two_stage")
    assert part.queries.pos_trans.out_features == 64  # positional + content halves
    learned = small_transformer(
        "test_deformable_detr_tiny_two_stage", "model.queries.content=learned"
    )
    assert learned.queries.pos_trans.out_features == 32 and learned.queries.content is not None


def test_patterns_repeat_every_anchor_pattern_major():
    part = small_transformer("test_dab_deformable_detr_tiny", "model.queries.num_patterns=3")
    srcs, masks, pos = levels_input(SHAPES, SHAPES)
    tokens, levels = flatten_levels(srcs, masks, pos, part.level_embed)
    q = part.queries(part.encoder(tokens, levels), levels, part.heads)
    assert q.content.shape == (1, 24, 32) and q.reference.shape == (1, 24, 4)
    anchors = part.queries.anchors.weight.sigmoid()
    torch.testing.assert_close(q.reference[0, 8:16], anchors)  # pattern 1, anchors 0..7
    content, patterns = part.queries.content.weight, part.queries.patterns.weight
    torch.testing.assert_close(q.content[0, 8 + 5], content[5] + patterns[1])
    assert part.queries.num_matching == 24


def test_random_anchor_centres_are_uniform_and_stay_fixed():
    torch.manual_seed(0)
    init = QueryInitialiser(
        "anchors", "zero", 32, num_queries=500, random_refpoints_xy=True, eps=1e-3
    )
    xy = init.anchors.weight[:, :2].sigmoid()
    assert 0.4 < xy.mean() < 0.6 and xy.min() < 0.05 and xy.max() > 0.95
    ref = init._learned(2)[1]
    ref.sum().backward()
    grad = init.anchors.weight.grad
    assert (grad[:, :2] == 0).all() and (grad[:, 2:] != 0).all()


def test_label_content_is_the_unknown_label_with_the_indicator():
    part = small_transformer("test_dn_detr_tiny")
    srcs, masks, pos = levels_input(SHAPES[:1], SHAPES[:1])
    tokens, levels = flatten_levels(srcs, masks, pos, part.level_embed)
    unknown = part.denoising.unknown_label()
    assert unknown.shape == (31,) and part.denoising.label_enc.weight.shape == (6, 31)
    q = part.queries(part.encoder(tokens, levels), levels, part.heads, unknown)
    torch.testing.assert_close(q.content[0, 3], torch.cat([unknown, torch.zeros(1)]))
    with pytest.raises(ValueError, match="label embedding"):
        part.queries(part.encoder(tokens, levels), levels, part.heads, None)
