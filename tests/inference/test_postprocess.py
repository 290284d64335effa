from __future__ import annotations

import math

import pytest
import torch

from detrkit.config import Config
from detrkit.inference.postprocess import PostProcessor, build_postprocessor
from detrkit.structures import DetectorOutput, LayerOutput


def test_softmax_one_detection_per_query():
    # 1 image, 2 queries, 2 classes + "no object"
    logits = torch.tensor(
        [
            [
                [math.log(6.0), math.log(3.0), 0.0],  # p = .6 .3 .1
                [0.0, math.log(2.0), math.log(7.0)],
            ]
        ]
    )  # p = .1 .2 .7
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    sizes = torch.tensor([[100, 200]])  # (h, w)
    (det,) = PostProcessor("softmax")(DetectorOutput(logits, boxes), sizes)
    torch.testing.assert_close(det.scores, torch.tensor([0.6, 0.2]))
    assert det.labels.tolist() == [0, 1]  # "no object" never wins, even when most likely
    assert det.query_index.tolist() == [0, 1]
    torch.testing.assert_close(
        det.boxes_xyxy, torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    )


def test_sigmoid_top_k_over_query_class_pairs():
    p = torch.tensor([[[0.1, 0.9, 0.2], [0.8, 0.05, 0.7]]])  # 1 image, 2 queries, 3 classes
    logits = torch.log(p / (1 - p))
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.2, 0.2]]])
    sizes = torch.tensor([[10, 20]])
    (det,) = PostProcessor("sigmoid", num_select=3)(LayerOutput(logits, boxes), sizes)
    torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.8, 0.7]))
    assert det.labels.tolist() == [1, 0, 2]
    assert det.query_index.tolist() == [0, 1, 1]
    torch.testing.assert_close(
        det.boxes_xyxy,
        torch.tensor([[0.0, 0.0, 20.0, 10.0], [0.0, 1.0, 4.0, 3.0], [0.0, 1.0, 4.0, 3.0]]),
    )


def test_sigmoid_default_and_capped_k_and_batch_sizes():
    g = torch.Generator().manual_seed(0)
    out = LayerOutput(torch.randn(2, 30, 5, generator=g), torch.rand(2, 30, 4, generator=g) * 0.5)
    sizes = torch.tensor([[100, 50], [60, 80]])
    dets = PostProcessor("sigmoid")(out, sizes)
    assert [len(d) for d in dets] == [100, 100]
    assert (dets[0].scores[:-1] >= dets[0].scores[1:]).all()
    small = LayerOutput(out.logits[:, :3], out.boxes[:, :3])
    assert [len(d) for d in PostProcessor("sigmoid", 50)(small, sizes)] == [15, 15]
    # each image is scaled by its own size
    from detrkit.boxes import cxcywh_to_xyxy

    for b, d in enumerate(dets):
        ref = cxcywh_to_xyxy(out.boxes[b, d.query_index]) * torch.tensor(
            [sizes[b, 1], sizes[b, 0], sizes[b, 1], sizes[b, 0]]
        )
        torch.testing.assert_close(d.boxes_xyxy, ref)


def test_float32_output_from_bfloat16_and_bad_sizes():
    logits = torch.randn(1, 4, 3).bfloat16()
    boxes = torch.rand(1, 4, 4).bfloat16()
    (det,) = PostProcessor("softmax")(DetectorOutput(logits, boxes), torch.tensor([[8, 8]]))
    assert det.scores.dtype == torch.float32 and det.boxes_xyxy.dtype == torch.float32
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcessor("softmax")(DetectorOutput(logits, boxes), torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="class_activation"):
        PostProcessor("relu")  # type: ignore[arg-type]


def test_build_postprocessor():
    cfg = Config()
    pp = build_postprocessor(cfg)
    assert pp.class_activation == "softmax" and pp.num_select is None
    cfg.model.class_activation = "sigmoid"
    cfg.postprocess.num_select = 30
    pp = build_postprocessor(cfg)
    assert pp.class_activation == "sigmoid" and pp.num_select == 30
