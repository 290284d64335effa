import torch

from detrkit.boxes import (
    box_iou,
    cxcywh_to_xyxy,
    generalized_box_iou,
    inverse_sigmoid,
    xyxy_to_cxcywh,
)


def test_format_round_trip_and_known_values():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    assert torch.allclose(cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    x = torch.rand(50, 4)
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(x)), x, atol=1e-6)


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0, 4.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3=9 (union 7), 5x2=10 (union 5), identical
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0.0 - 5 / 10, 1.0]]))


def test_giou_rejects_degenerate_boxes():
    import pytest

    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(
            torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        )


def test_inverse_sigmoid_inverts_and_clamps():
    x = torch.linspace(0.01, 0.99, 20)
    assert torch.allclose(torch.sigmoid(inverse_sigmoid(x)), x, atol=1e-6)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()
    assert (
        inverse_sigmoid(torch.tensor([0.0]), eps=1e-3).item()
        < inverse_sigmoid(torch.tensor([0.0]), eps=1e-2).item()
    )
