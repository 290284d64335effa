"""``detrkit check-data``: validate a COCO (or Pascal VOC) dataset and summarise it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from detrkit.data.coco import CocoIndex, load_coco_index
from detrkit.data.errors import DatasetWarning
from detrkit.data.voc import voc_to_coco

__all__ = ["check_dataset"]


def check_dataset(images_dir: str | Path, annotations_file: str | Path) -> str:
    """Validate ``annotations_file`` against ``images_dir`` exactly as training would (every
    image file's presence and header size included) and return a readable multi-line report:
    image / annotation counts, per-class box and image counts, images without boxes, box size
    range, and the repairs that loading makes. Raises :class:`DatasetError` on fatal problems.

    annotations_file: a COCO JSON file, or Pascal VOC annotations (one ``.xml`` file or a
    folder of them), checked through their COCO conversion (:func:`voc_to_coco`).
    """
    source = Path(annotations_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # reported below instead
        if source.is_dir() or source.suffix.lower() == ".xml":
            with tempfile.TemporaryDirectory() as tmp:
                converted = Path(tmp) / "voc_as_coco.json"
                voc_to_coco(images_dir, source, converted)
                index = load_coco_index(images_dir, converted, check_image_sizes=True)
                return _report(index, f"{source} (Pascal VOC)")
        index = load_coco_index(images_dir, source, check_image_sizes=True)
        return _report(index, str(source))


def _report(index: CocoIndex, source: str) -> str:
    records = index.records
    num_classes = len(index.label_map)
    boxes_per_class = np.zeros(num_classes, np.int64)
    images_per_class = np.zeros(num_classes, np.int64)
    widths, heights = [], []
    for record in records:
        if len(record.labels):
            boxes_per_class += np.bincount(record.labels, minlength=num_classes)
            images_per_class[np.unique(record.labels)] += 1
            widths.append(record.boxes_xyxy[:, 2] - record.boxes_xyxy[:, 0])
            heights.append(record.boxes_xyxy[:, 3] - record.boxes_xyxy[:, 1])
    num_boxes = int(boxes_per_class.sum())
    num_crowd = sum(r.num_crowd for r in records)
    empty = sum(1 for r in records if len(r.labels) == 0)
    dropped = index.num_annotations - num_boxes - num_crowd

    lines = [
        f"annotations: {source}",
        f"images dir:  {index.images_dir}",
        f"images:      {len(records)} ({empty} without boxes)",
        f"annotations: {index.num_annotations} ({num_boxes} boxes used for training, "
        f"{num_crowd} crowd, {dropped} dropped)",
        f"classes:     {num_classes} (category ids mapped to indices 0..{num_classes - 1} "
        "in ascending id order)",
    ]
    name_width = max([len(n) for n in index.label_map.names] + [4])
    lines.append(f"  {'index':>5}  {'id':>6}  {'name':<{name_width}}  {'boxes':>7}  {'images':>7}")
    for i, (cid, name) in enumerate(zip(index.label_map.category_ids, index.label_map.names)):
        lines.append(
            f"  {i:>5}  {cid:>6}  {name:<{name_width}}  {int(boxes_per_class[i]):>7}"
            f"  {int(images_per_class[i]):>7}"
        )
    if widths:
        w, h = np.concatenate(widths), np.concatenate(heights)
        lines.append(
            f"box size:    width {w.min():.1f}..{w.max():.1f} (median "
            f"{np.median(w):.1f}), height {h.min():.1f}..{h.max():.1f} (median "
            f"{np.median(h):.1f}) pixels"
        )
    if index.repairs:
        lines.append(f"repairs:     {len(index.repairs)} kind(s), applied when loading")
        # a VOC check loads a temporary conversion: name the user's files instead
        lines.extend(
            f"  - {message.replace(str(index.annotations_file), source)}"
            for message in index.repairs
        )
    else:
        lines.append("repairs:     none needed")
    return "\n".join(lines)
