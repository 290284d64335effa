"""The core value types: ``Prediction.to_supervision`` (the ``supervision`` extra)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from detrkit.structures import Prediction


def _prediction() -> Prediction:
    return Prediction(
        boxes_xyxy=torch.tensor(
            [[10.25, 20.5, 110.125, 220.0], [0.0, 0.0, 5.5, 7.75], [300.0, 1.0, 639.5, 479.0]]
        ),
        scores=torch.tensor([0.9375, 0.5, 0.123456789]),
        labels=torch.tensor([2, 0, 2]),
        names=["dead tree", "live", "dead tree"],
        category_ids=[7, 3, 7],
        image_size=(480, 640),
    )


def test_to_supervision_keeps_boxes_scores_labels_and_names():
    pytest.importorskip("supervision")
    pred = _prediction()
    det = pred.to_supervision()
    assert len(det) == 3
    assert det.xyxy.dtype == np.float32 and det.xyxy.shape == (3, 4)
    np.testing.assert_array_equal(
        det.xyxy,
        np.array(
            [[10.25, 20.5, 110.125, 220.0], [0.0, 0.0, 5.5, 7.75], [300.0, 1.0, 639.5, 479.0]],
            dtype=np.float32,
        ),
    )
    np.testing.assert_array_equal(
        det.confidence, np.array([0.9375, 0.5, 0.123456789], dtype=np.float32)
    )
    assert det.class_id.tolist() == [2, 0, 2]
    assert det.data["class_name"].tolist() == ["dead tree", "live", "dead tree"]
    assert det.data["category_id"].tolist() == [7, 3, 7]
    det.xyxy[0, 0] = -1.0  # a copy: the prediction stays as it was
    assert pred.boxes_xyxy[0, 0] == 10.25
    # supervision's own filtering keeps the columns together
    kept = det[det.confidence > 0.4]
    assert kept.data["class_name"].tolist() == ["dead tree", "live"]


def test_an_empty_prediction_converts_to_empty_detections():
    pytest.importorskip("supervision")
    empty = Prediction(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [], [], (64, 64)
    )
    det = empty.to_supervision()
    assert len(det) == 0 and det.xyxy.shape == (0, 4)
    assert det.confidence.shape == (0,) and det.class_id.shape == (0,)
    assert det.data["class_name"].shape == (0,)


def test_without_supervision_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # import supervision fails
    with pytest.raises(ImportError, match=r'pip install "detrkit\[supervision\]"'):
        _prediction().to_supervision()
