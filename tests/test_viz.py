"""Drawing detections and plotting training curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.viz import class_color, draw_detections, plot_metrics, to_pil


def _changed(before: np.ndarray, after: Image.Image) -> np.ndarray:
    return (np.asarray(after).astype(int) - before.astype(int)).any(axis=2)


def test_boxes_are_drawn_where_they_are_and_nowhere_else():
    image = np.full((80, 100, 3), 128, np.uint8)
    out = draw_detections(image, torch.tensor([[20.0, 30.0, 60.0, 70.0]]), labels=[2])
    changed = _changed(image, out)
    assert out.size == (100, 80)
    assert changed[30, 20:61].all() and changed[70, 20:61].all()  # top and bottom edges
    assert changed[30:71, 20].all() and changed[30:71, 60].all()  # left and right edges
    assert not changed[40:60, 30:50].any()  # the inside stays untouched
    assert not changed[:, 70:].any()  # far away: untouched
    assert tuple(np.asarray(out)[50, 20]) == class_color(2)
    assert (image == 128).all()  # the input is not modified


def test_label_text_is_written_and_classes_get_distinct_colours():
    image = np.zeros((60, 120, 3), np.uint8)
    boxes = [[5.0, 30.0, 50.0, 55.0], [60.0, 30.0, 110.0, 55.0]]
    plain = draw_detections(image, boxes)  # nothing to write
    texted = draw_detections(
        image, boxes, labels=[0, 1], scores=[0.9, 0.4], names=["circle", "square"]
    )
    above = np.s_[15:30, 5:50]  # the label box sits above the box
    assert not _changed(image, plain)[above].any()
    assert _changed(image, texted)[above].sum() > 50
    assert class_color(0) != class_color(1)
    assert tuple(np.asarray(texted)[45, 5]) == class_color(0)
    assert tuple(np.asarray(texted)[45, 60]) == class_color(1)


@pytest.mark.parametrize("kind", ["pil", "uint8_array", "float_tensor", "uint8_tensor"])
def test_every_image_kind_is_accepted(kind):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 1] = 200
    image = {
        "pil": Image.fromarray(rgb),
        "uint8_array": rgb,
        "float_tensor": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "uint8_tensor": torch.from_numpy(rgb).permute(2, 0, 1),
    }[kind]
    assert np.array_equal(np.asarray(to_pil(image)), rgb)
    out = draw_detections(image, [[4, 4, 20, 20]], names=["a"])
    assert _changed(rgb, out).any()


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        draw_detections(np.zeros((8, 8, 3), np.uint8), [[0, 0, 2, 2], [1, 1, 3, 3]], scores=[0.5])


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {
            "epoch": e,
            "lr": 1e-4,
            "train": {"loss": 3.0 - e},
            "eval": {"AP": 0.1 * e, "AP50": 0.2 * e, "loss": 3.5 - e},
            "time_s": 1.0,
        }
        for e in (1, 2, 3)
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics(metrics, tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
