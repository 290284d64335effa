from __future__ import annotations

import math

import pytest
import torch

from detrkit.criterion.matcher import HungarianMatcher
from detrkit.structures import Target


def _random_case(seed: int, bsz: int = 2, nq: int = 8, ncls: int = 5, sizes=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, nq, ncls, generator=g) * 2
    boxes = torch.cat(
        [
            torch.rand(bsz, nq, 2, generator=g) * 0.6 + 0.2,
            torch.rand(bsz, nq, 2, generator=g) * 0.3 + 0.05,
        ],
        -1,
    )
    targets = []
    for n in sizes:
        tb = torch.cat(
            [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05],
            -1,
        )
        targets.append(Target(boxes=tb, labels=torch.randint(0, ncls - 1, (n,), generator=g)))
    return logits, boxes, targets


def _pairs(match):
    return sorted(zip(match[0].tolist(), match[1].tolist()))


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_empty_targets_one_image_and_whole_batch(class_cost):
    matcher = HungarianMatcher(2, 5, 2, class_cost)
    logits, boxes, targets = _random_case(0, sizes=(3, 0))
    out = matcher(logits, boxes, targets)
    assert len(out[0][0]) == 3 and len(out[0][1]) == 3
    assert out[1][0].numel() == 0 and out[1][1].numel() == 0
    assert out[1][0].dtype == torch.int64 and out[1][1].dtype == torch.int64
    empty = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)) for _ in range(2)]
    for src, tgt in matcher(logits, boxes, empty):
        assert src.numel() == 0 and tgt.numel() == 0 and src.dtype == torch.int64


def test_hand_checkable_assignment():
    # two queries, two targets; query 0 sits exactly on target 1, query 1 on target 0
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.zeros(1, 2, 3)
    target = Target(
        boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]),
        labels=torch.tensor([0, 1]),
    )
    src, tgt = HungarianMatcher(1, 5, 2, "softmax")(logits, boxes, [target])[0]
    assert src.tolist() == [0, 1] and tgt.tolist() == [1, 0]
    # the class cost alone decides when boxes are identical: query 1 is sure of class 1
    boxes = torch.full((1, 2, 4), 0.5)
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])
    target = Target(boxes=torch.full((2, 4), 0.5), labels=torch.tensor([1, 0]))
    src, tgt = HungarianMatcher(1, 5, 2, "softmax")(logits, boxes, [target])[0]
    assert tgt.tolist() == [1, 0]


def test_more_targets_than_queries_matches_every_query():
    logits, boxes, targets = _random_case(3, bsz=1, nq=2, sizes=(4,))
    src, tgt = HungarianMatcher(2, 5, 2, "focal")(logits, boxes, targets)[0]
    assert src.tolist() == [0, 1] and len(set(tgt.tolist())) == 2


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_query_permutation_permutes_assignment(class_cost):
    matcher = HungarianMatcher(2, 5, 2, class_cost)
    logits, boxes, targets = _random_case(1)
    base = matcher(logits, boxes, targets)
    perm = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(7))
    permuted = matcher(logits[:, perm], boxes[:, perm], targets)
    for b in range(len(targets)):
        src, tgt = permuted[b]
        assert src.tolist() == sorted(src.tolist())
        back = [(perm[s].item(), t) for s, t in zip(src.tolist(), tgt.tolist())]
        assert sorted(back) == _pairs(base[b])


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_target_permutation_permutes_assignment(class_cost):
    matcher = HungarianMatcher(2, 5, 2, class_cost)
    logits, boxes, targets = _random_case(2)
    base = matcher(logits, boxes, targets)
    for b, t in enumerate(targets):
        perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(b))
        shuffled = [Target(x.boxes, x.labels) for x in targets]
        shuffled[b] = Target(t.boxes[perm], t.labels[perm])
        src, tgt = matcher(logits, boxes, shuffled)[b]
        back = [(s, perm[j].item()) for s, j in zip(src.tolist(), tgt.tolist())]
        assert sorted(back) == _pairs(base[b])


def test_pairs_and_targets_give_same_result():
    matcher = HungarianMatcher(2, 5, 2, "focal")
    logits, boxes, targets = _random_case(4)
    a = matcher(logits, boxes, targets)
    b = matcher(logits, boxes, [(t.labels, t.boxes) for t in targets])
    assert all(_pairs(x) == _pairs(y) for x, y in zip(a, b))


def test_focal_and_softmax_class_costs():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    labels = torch.tensor([1, 2])
    soft = HungarianMatcher(1, 0, 0, "softmax").class_cost_matrix(logits, labels)
    torch.testing.assert_close(soft, -logits.softmax(-1)[:, [1, 2]])
    focal = HungarianMatcher(1, 0, 0, "focal", focal_alpha=0.25, focal_gamma=2.0)
    cost = focal.class_cost_matrix(logits, labels)
    for j, label in enumerate(labels.tolist()):
        p = torch.sigmoid(logits[0, label]).item()
        expected = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
        assert cost[0, j].item() == pytest.approx(expected, rel=1e-5)
    # the focal cost falls as the target-class logit rises
    grid = torch.linspace(-4, 4, 9)[:, None].repeat(1, 3)
    costs = focal.class_cost_matrix(grid, torch.tensor([0]))[:, 0]
    assert (costs[1:] < costs[:-1]).all()


def test_focal_and_softmax_can_disagree():
    # query 0: softmax spreads over two strong classes; query 1: one moderate logit.
    # sigmoid treats classes independently, softmax does not.
    logits = torch.tensor([[[3.0, 3.0, -5.0], [1.0, -5.0, -5.0]]])
    boxes = torch.full((1, 2, 4), 0.5)
    target = Target(boxes=torch.full((1, 4), 0.5), labels=torch.tensor([0]))
    soft = HungarianMatcher(1, 0, 1, "softmax")(logits, boxes, [target])[0]
    focal = HungarianMatcher(1, 0, 1, "focal")(logits, boxes, [target])[0]
    assert soft[0].tolist() == [1]
    assert focal[0].tolist() == [0]


def test_cost_is_float32_under_autocast_and_grad_free():
    matcher = HungarianMatcher(2, 5, 2, "focal")
    logits, boxes, targets = _random_case(5)
    logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(
            logits.bfloat16(),
            boxes.bfloat16(),
            torch.cat([t.labels for t in targets]),
            torch.cat([t.boxes for t in targets]),
        )
        out = matcher(logits, boxes, targets)
    assert cost.dtype == torch.float32 and cost.shape == (2, 8, 5)
    assert not cost.requires_grad
    assert [_pairs(m) for m in out] == [_pairs(m) for m in matcher(logits, boxes, targets)]


def test_bad_inputs_raise_clear_errors():
    matcher = HungarianMatcher(2, 5, 2, "focal")
    logits, boxes, targets = _random_case(6)
    with pytest.raises(ValueError, match="targets for a batch"):
        matcher(logits, boxes, targets[:1])
    with pytest.raises(ValueError, match=r"\[B, Q, 4\]"):
        matcher(logits, boxes[..., :2], targets)
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")  # type: ignore[arg-type]
    logits[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        matcher(logits, boxes, targets)
