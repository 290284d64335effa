"""COCO box metrics of :class:`~detrkit.structures.Detections` (via ``faster-coco-eval``).

Usage::

    evaluator = CocoEvaluator("annotations/instances_val.json", label_map)
    for image_ids, detections in ...:            # boxes in ORIGINAL image pixels (xyxy)
        evaluator.update(image_ids, detections)
    metrics = evaluator.summarize()              # {"AP": ..., "AP50": ..., ...}

Only the images passed to :meth:`CocoEvaluator.update` are scored (as in the official DETR
evaluator), so a partial pass gives the metrics of that part.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from detrkit.structures import Detections, LabelMap

__all__ = ["CocoEvaluator", "METRIC_NAMES"]

# the first nine COCO summary numbers, in COCOeval's order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


class CocoEvaluator:
    """Accumulate detections and compute the COCO bbox metrics.

    Args:
        annotations_file: COCO-format JSON with the ground truth (``images``,
            ``annotations`` with ``bbox`` as absolute ``[x, y, w, h]``, ``categories``).
        label_map: maps the model's contiguous class index ``i`` to the dataset category id
            ``label_map.category_ids[i]`` (ids need not be contiguous).
    """

    def __init__(self, annotations_file: str | Path, label_map: LabelMap) -> None:
        from faster_coco_eval import COCO

        path = Path(annotations_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: COCO annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco_gt = COCO(str(path))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable COCO annotation file ({err})") from None
        known = set(self.coco_gt.getCatIds())
        missing = [c for c in label_map.category_ids if c not in known]
        if missing:
            raise ValueError(
                f"{path}: label map category ids {missing} are not among the "
                f"file's categories {sorted(known)}; use the label map of this "
                "dataset"
            )
        self.annotations_file = path
        self.label_map = label_map
        self._image_ids = set(self.coco_gt.getImgIds())
        self.results: list[dict] = []
        self.unlabelled = 0  # detections of class indices beyond the label map, left out
        self.evaluated_ids: list[int] = []

    def update(self, image_ids: list[int], detections: list[Detections]) -> None:
        """Add the detections of a batch.

        image_ids: the dataset image id of each image. detections: boxes_xyxy ``[K, 4]`` in
        absolute pixels of the ORIGINAL image, scores ``[K]``, labels ``[K]`` contiguous indices.
        """
        if len(image_ids) != len(detections):
            raise ValueError(
                f"CocoEvaluator.update: {len(image_ids)} image ids for "
                f"{len(detections)} detection sets"
            )
        category_ids = self.label_map.category_ids
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            if image_id not in self._image_ids:
                raise ValueError(
                    f"{self.annotations_file}: image id {image_id} is not in the "
                    "annotation file; evaluate with the matching annotations"
                )
            self.evaluated_ids.append(image_id)
            if len(det) == 0:
                continue
            boxes = det.boxes_xyxy.detach().float().cpu()
            xywh = boxes.clone()
            xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]  # [K, 4] (x, y, w, h)
            labels = det.labels.detach().cpu().tolist()
            for box, score, label in zip(
                xywh.tolist(), det.scores.detach().float().cpu().tolist(), labels
            ):
                if not 0 <= label < len(category_ids):
                    # a class the dataset does not have (model.num_classes above the data's):
                    # it has no ground truth, so COCO would ignore it anyway
                    self.unlabelled += 1
                    continue
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": category_ids[label],
                        "bbox": box,
                        "score": float(score),
                    }
                )

    def state(self) -> tuple[list[dict], list[int], int]:
        """What :meth:`update` accumulated (results, evaluated image ids, unlabelled count): a
        picklable record another process's evaluator can :meth:`merge`."""
        return self.results, self.evaluated_ids, self.unlabelled

    def merge(self, states: list[tuple[list[dict], list[int], int]]) -> None:
        """Replace the accumulated detections by the union of ``states`` (every process's
        :meth:`state`, this one's included), so :meth:`summarize` scores all of them once."""
        self.results = [r for results, _, _ in states for r in results]
        self.evaluated_ids = [i for _, ids, _ in states for i in ids]
        self.unlabelled = sum(count for _, _, count in states)

    def summarize(self) -> dict[str, float]:
        """``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100`` in ``[0, 1]`` over the images seen
        by :meth:`update`. Metrics COCO cannot define (no image evaluated, or no ground truth
        in an area range) are reported as 0.0."""
        from faster_coco_eval import COCOeval_faster

        if not self.evaluated_ids:
            return dict.fromkeys(METRIC_NAMES, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes([dict(r) for r in self.results])  # it adds keys
            coco_eval = COCOeval_faster(
                self.coco_gt, coco_dt, iouType="bbox", print_function=lambda *args, **kwargs: None
            )
            coco_eval.params.imgIds = sorted(set(self.evaluated_ids))
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = [float(v) for v in coco_eval.stats[: len(METRIC_NAMES)]]
        return {name: max(value, 0.0) for name, value in zip(METRIC_NAMES, stats)}

    def save_results(self, path: str | Path) -> Path:
        """Write the accumulated detections as a COCO results JSON
        (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path
