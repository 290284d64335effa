"""Sine embeddings of boxes and points, and box refinement in inverse-sigmoid space."""

import math

import pytest
import torch

from detrkit.boxes import inverse_sigmoid
from detrkit.models.embeddings import XYWH, YXWH, box_sine_embedding, refine_boxes


def _reference(coord: float, num_feats: int, k: int) -> tuple[float, float]:
    """Channels 2j, 2j+1 of one coordinate: sin / cos of coord * 2 pi / 10000^(2j/F)."""
    freq = 10000 ** (2 * (k // 2) / num_feats)
    x = coord * 2 * math.pi / freq
    return math.sin(x), math.cos(x)


@pytest.mark.parametrize("order", [YXWH, XYWH])
def test_box_embedding_layout(order):
    box = torch.tensor([[0.2, 0.7, 0.3, 0.9]])
    emb = box_sine_embedding(box, 16, order)
    assert emb.shape == (1, 64)
    for block, coord in enumerate(order):
        for j in (0, 3, 7):
            s, c = _reference(float(box[0, coord]), 16, 2 * j)
            assert emb[0, block * 16 + 2 * j].item() == pytest.approx(s, abs=1e-6)
            assert emb[0, block * 16 + 2 * j + 1].item() == pytest.approx(c, abs=1e-6)
    # points give the first two blocks of the same coordinates
    points = box_sine_embedding(box[:, :2], 16, order)
    torch.testing.assert_close(points, emb[:, :32])
    # the default order starts with y
    assert box_sine_embedding(box, 16)[0, 0] == pytest.approx(_reference(0.7, 16, 0)[0], abs=1e-6)


def test_embedding_keeps_float32_frequencies_for_float64_input():
    box = torch.rand(3, 4, dtype=torch.float64)
    emb = box_sine_embedding(box, 8)
    assert emb.dtype == torch.float64
    torch.testing.assert_close(emb.float(), box_sine_embedding(box.float(), 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\] or \[\.\.\., 4\]"):
        box_sine_embedding(torch.rand(2, 3), 8)


def test_refine_boxes_points_and_none():
    delta = torch.tensor([[0.5, -0.5, 1.0, -1.0]])
    box = torch.tensor([[0.4, 0.6, 0.2, 0.3]])
    torch.testing.assert_close(
        refine_boxes(delta, box, 1e-5), (delta + inverse_sigmoid(box, 1e-5)).sigmoid()
    )
    point = box[:, :2]
    out = refine_boxes(delta, point, 1e-5)
    torch.testing.assert_close(out[:, :2], (delta[:, :2] + inverse_sigmoid(point)).sigmoid())
    torch.testing.assert_close(out[:, 2:], delta[:, 2:].sigmoid())
    torch.testing.assert_close(refine_boxes(delta, None, 1e-5), delta.sigmoid())
    # the clamp: a reference at exactly 0 stays finite, and a larger eps moves it further in
    edge = torch.zeros(1, 4)
    assert (
        refine_boxes(torch.zeros(1, 4), edge, 1e-3)[0, 0]
        > refine_boxes(torch.zeros(1, 4), edge, 1e-5)[0, 0]
        > 0
    )
