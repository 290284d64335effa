"""Sliced inference: boxes shifted from tiles to the image, duplicates across overlapping tiles
merged by NMS or weighted box fusion, distinct objects kept; a real tiny model end to end; the
``detrkit predict --tile`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.api import Detector, Prediction
from detrkit.cli import main
from detrkit.inference.sliced import predict_sliced, weighted_box_fusion


class FakeDetector:
    """Detects the objects given in image pixels (absolute xyxy, score, label) in any crop of
    the test image: a crop's origin is its ``tile_origin`` (see ``patch_crop``; none: the
    whole image). A box is reported, clipped and in the crop's own pixels, by every crop
    holding at least ``min_part`` of its area, its score times ``partial`` when it was cut.
    Records the number of images of each call."""

    read_image = staticmethod(Detector.read_image)

    def __init__(self, objects, min_part=0.3, partial=0.5):
        self.objects, self.min_part, self.partial = objects, min_part, partial
        self.calls: list[int] = []

    def _detect(self, image, threshold):
        x0, y0 = getattr(image, "tile_origin", (0, 0))
        w, h = image.width, image.height
        boxes, scores, labels = [], [], []
        for (bx0, by0, bx1, by1), score, label in self.objects:
            cx0, cy0 = max(bx0, x0), max(by0, y0)
            cx1, cy1 = min(bx1, x0 + w), min(by1, y0 + h)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            part = (cx1 - cx0) * (cy1 - cy0) / ((bx1 - bx0) * (by1 - by0))
            s = score if part == 1 else score * self.partial
            if part >= self.min_part and s >= threshold:
                boxes.append([cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0])
                scores.append(s)
                labels.append(label)
        return Prediction(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(scores, dtype=torch.float32),
            torch.tensor(labels, dtype=torch.int64),
            [f"c{i}" for i in labels],
            [10 + i for i in labels],
            (h, w),
        )

    def predict(self, images, threshold=0.5, *, batch_size=8):
        self.calls.append(len(images))
        return [self._detect(image, threshold) for image in images]


def _image(width, height):
    return Image.fromarray(np.zeros((height, width, 3), np.uint8))


@pytest.fixture
def patch_crop(monkeypatch):
    """Crops of PIL images record their origin, so the fake detector can place them."""
    original = Image.Image.crop

    def crop(self, box=None):
        out = original(self, box)
        out.tile_origin = (int(box[0]), int(box[1])) if box is not None else (0, 0)
        return out

    monkeypatch.setattr(Image.Image, "crop", crop)


# 300 x 200 image, tiles of 128 with overlap 0.25: x starts 0, 96, 172; y starts 0, 72
OBJECTS = [
    ((100, 20, 120, 40), 0.9, 1),  # inside tiles x0=0 and x0=96: a duplicate across tiles
    ((10, 150, 40, 190), 0.8, 0),  # inside the tiles at y0=72 only
    ((101, 21, 121, 41), 0.7, 0),  # overlaps the first object, but another class: kept
    ((250, 10, 290, 50), 0.6, 1),  # only the right-most tiles
]


@pytest.mark.parametrize("merge", ["nms", "fusion"])
def test_boxes_are_shifted_and_duplicates_merged(patch_crop, merge):
    detector = FakeDetector(OBJECTS, min_part=1.0)  # only whole objects are seen
    pred = predict_sliced(
        detector, _image(300, 200), tile=128, overlap=0.25, merge=merge, threshold=0.1,
        batch_size=4,
    )  # fmt: skip
    assert detector.calls == [6]  # all 3 x 2 tiles in one predict call, batched inside
    assert pred.image_size == (200, 300)
    got = sorted(zip(pred.boxes_xyxy.tolist(), pred.scores.tolist(), pred.labels.tolist()),
                 key=lambda t: -t[1])  # fmt: skip
    expected = sorted(OBJECTS, key=lambda t: -t[1])
    assert len(got) == len(expected)
    for (box, score, label), (ebox, escore, elabel) in zip(got, expected):
        assert box == pytest.approx(list(ebox), abs=1e-4)
        assert score == pytest.approx(escore) and label == elabel
    assert pred.scores.tolist() == sorted(pred.scores.tolist(), reverse=True)
    assert pred.names == [f"c{i}" for i in pred.labels.tolist()]
    assert pred.category_ids == [10 + i for i in pred.labels.tolist()]


def test_fusion_averages_cut_and_whole_boxes_by_score(patch_crop):
    # tiles of 100 px (overlap 0.2) at x0 = 0 and 80: a box x 90..130, y 10..30 is cut by the
    # first tile's edge at x=100 (25 % inside: seen as [90, 10, 100, 30], score 0.8 * 0.5)
    # and seen whole by the second
    objects = [((90, 10, 130, 30), 0.8, 0)]
    detector = FakeDetector(objects, min_part=0.2, partial=0.5)
    nms = predict_sliced(detector, _image(180, 100), 100, 0.2, merge="nms", iou_threshold=0.2,
                         threshold=0.1)  # fmt: skip
    # the cut box [90, 10, 100, 30] (score 0.4) has IoU 0.25 with the whole one: suppressed
    assert nms.boxes_xyxy.tolist() == [[90, 10, 130, 30]] and nms.scores.tolist() == [
        pytest.approx(0.8)
    ]
    fused = predict_sliced(detector, _image(180, 100), 100, 0.2, merge="fusion",
                           iou_threshold=0.2, threshold=0.1)  # fmt: skip
    # score-weighted mean: x1 = (0.8 * 130 + 0.4 * 100) / 1.2 = 120; score = the best, 0.8
    assert fused.boxes_xyxy.tolist()[0] == pytest.approx([90, 10, 120, 30], abs=1e-4)
    assert fused.scores.tolist() == [pytest.approx(0.8)]
    # with a strict IoU threshold both boxes stay
    assert len(predict_sliced(detector, _image(180, 100), 100, 0.2, merge="fusion",
                              iou_threshold=0.5, threshold=0.1)) == 2  # fmt: skip


def test_full_image_pass_is_merged_in(patch_crop):
    objects = [((20, 20, 200, 150), 0.9, 0)]  # larger than a tile: only the full pass sees it
    detector = FakeDetector(objects, min_part=1.0)
    assert len(predict_sliced(detector, _image(300, 200), 128, threshold=0.1)) == 0
    pred = predict_sliced(detector, _image(300, 200), 128, threshold=0.1, full_image=True)
    assert pred.boxes_xyxy.tolist() == [[20, 20, 200, 150]]
    assert detector.calls[-2:] == [6, 1]


def test_weighted_box_fusion_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]],
                         dtype=torch.float32)  # fmt: skip
    scores = torch.tensor([0.6, 0.3, 0.5, 0.9])
    labels = torch.tensor([0, 0, 1, 0])
    fb, fs, fl = weighted_box_fusion(boxes, scores, labels, iou_threshold=0.5)
    assert fl.tolist() == [0, 0, 1] and fs.tolist() == pytest.approx([0.9, 0.6, 0.5])
    assert fb[0].tolist() == [50, 50, 60, 60] and fb[2].tolist() == [0, 0, 10, 10]
    # (0.6 * 0 + 0.3 * 1) / 0.9 = 1/3 and (0.6 * 10 + 0.3 * 11) / 0.9 = 10 + 1/3
    assert fb[1].tolist() == pytest.approx([1 / 3, 1 / 3, 31 / 3, 31 / 3], abs=1e-5)
    empty = weighted_box_fusion(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0).long())
    assert [t.shape[0] for t in empty] == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"tile": 0}, "tile: must be a positive integer"), ({"overlap": 1.2}, "overlap"),
     ({"merge": "max"}, "merge")],
)  # fmt: skip
def test_bad_arguments(kwargs, needle):
    args = {"tile": 64, "overlap": 0.2, **kwargs}
    with pytest.raises(ValueError, match=needle):
        predict_sliced(FakeDetector([]), _image(100, 100), **args)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Detector.from_preset("test_detr_tiny", device="cpu")


def test_a_real_tiny_model_end_to_end(tiny):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    pred = predict_sliced(tiny, image, tile=200, overlap=0.2, merge="fusion", threshold=0.0)
    assert pred.image_size == (300, 500) and len(pred) > 0
    boxes = pred.boxes_xyxy
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 500).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 300).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert len(pred.names) == len(pred) == len(pred.category_ids)


def test_cli_predict_with_tiles(tiny, tmp_path, capsys):
    stem = tiny.save(tmp_path / "ckpt")
    picture = tmp_path / "big.png"
    Image.fromarray(np.full((300, 500, 3), 90, np.uint8)).save(picture)
    out = tmp_path / "preds"
    argv = ["predict", str(picture), "--checkpoint", str(stem), "--out", str(out),
            "--threshold", "0.0", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--tile", "200", "--overlap", "0.3", "--merge", "nms"]) == 0
    entries = json.loads((out / "predictions.json").read_text())
    assert entries and all(e["file_name"] == str(picture) for e in entries)
    for e in entries:
        x, y, w, h = e["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 500.01 and y + h <= 300.01
    assert Image.open(out / "big.png").size == (500, 300)
    capsys.readouterr()
    for extra, needle in [
        (["--tile", "0"], "--tile: must be a positive number"),
        (["--tile", "64", "--overlap", "1.2"], "--overlap: must be in [0, 1)"),
        (["--overlap", "0.2"], "--overlap: only applies with --tile"),
        (["--tile", "64", "--merge", "max"], "invalid choice"),
    ]:
        assert main([*argv, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
