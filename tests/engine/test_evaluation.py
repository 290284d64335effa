from __future__ import annotations

import json

import pytest
import torch

from detrkit.engine.evaluation import METRIC_NAMES, CocoEvaluator
from detrkit.structures import Detections, LabelMap

# category ids are deliberately not contiguous
LABEL_MAP = LabelMap(category_ids=[3, 7, 42], names=["cat", "dog", "tree"])
GT = {  # image id -> [(category id, [x, y, w, h])]
    10: [(3, [10.0, 20.0, 100.0, 80.0]), (42, [150.0, 40.0, 60.0, 120.0])],
    11: [(7, [5.0, 5.0, 200.0, 150.0])],
    12: [(3, [30.0, 30.0, 50.0, 50.0]), (7, [100.0, 100.0, 120.0, 90.0])],
}


@pytest.fixture()
def annotations(tmp_path):
    images = [{"id": i, "width": 320, "height": 240, "file_name": f"{i}.png"} for i in GT]
    anns = []
    for image_id, objects in GT.items():
        for cat, box in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c, "name": n} for c, n in zip(LABEL_MAP.category_ids, LABEL_MAP.names)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _detections(image_id: int, wrong_class: bool = False) -> Detections:
    objects = GT[image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects])
    labels = torch.tensor([LABEL_MAP.category_ids.index(c) for c, _ in objects])
    if wrong_class:
        labels = (labels + 1) % len(LABEL_MAP)
    n = len(objects)
    return Detections(boxes, torch.ones(n), labels, torch.arange(n))


def _empty() -> Detections:
    return Detections(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )


def test_perfect_predictions_give_ap_one(annotations, tmp_path):
    ev = CocoEvaluator(annotations, LABEL_MAP)
    ev.update([10, 11], [_detections(10), _detections(11)])
    ev.update([12], [_detections(12)])
    metrics = ev.summarize()
    assert set(metrics) == set(METRIC_NAMES)
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    out = ev.save_results(tmp_path / "res" / "results.json")
    results = json.loads(out.read_text())
    assert len(results) == 5
    first = next(r for r in results if r["image_id"] == 10 and r["category_id"] == 42)
    assert first["bbox"] == pytest.approx([150.0, 40.0, 60.0, 120.0])
    assert set(first) == {"image_id", "category_id", "bbox", "score"}


def test_empty_predictions_give_zero(annotations):
    ev = CocoEvaluator(annotations, LABEL_MAP)
    ev.update(list(GT), [_empty() for _ in GT])
    assert all(v == 0.0 for v in ev.summarize().values())
    assert all(v == 0.0 for v in CocoEvaluator(annotations, LABEL_MAP).summarize().values())


def test_wrong_class_lowers_ap(annotations):
    perfect = CocoEvaluator(annotations, LABEL_MAP)
    wrong = CocoEvaluator(annotations, LABEL_MAP)
    for image_id in GT:
        perfect.update([image_id], [_detections(image_id)])
        wrong.update([image_id], [_detections(image_id, wrong_class=image_id == 12)])
    assert wrong.summarize()["AP"] < perfect.summarize()["AP"] - 0.1


def test_only_updated_images_are_scored(annotations):
    ev = CocoEvaluator(annotations, LABEL_MAP)
    ev.update([11], [_detections(11)])  # images 10 and 12 never seen: not counted as misses
    assert ev.summarize()["AP"] == pytest.approx(1.0)


def test_bad_inputs(annotations, tmp_path):
    ev = CocoEvaluator(annotations, LABEL_MAP)
    with pytest.raises(ValueError, match="image id 99"):
        ev.update([99], [_detections(11)])
    bad = Detections(
        torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
        torch.ones(1),
        torch.tensor([5]),
        torch.zeros(1, dtype=torch.int64),
    )
    # a class index beyond the label map (model.num_classes above the data's) has no ground
    # truth: left out and counted, never an error after the training is done
    ev.update([11], [bad])
    assert ev.unlabelled == 1 and ev.results == []
    ev.update([11], [_detections(11)])
    assert ev.summarize()["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="category ids"):
        CocoEvaluator(annotations, LabelMap([1, 2], ["a", "b"]))
    with pytest.raises(FileNotFoundError):
        CocoEvaluator(tmp_path / "missing.json", LABEL_MAP)
