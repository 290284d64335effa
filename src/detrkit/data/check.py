"""``detrkit check-data``: validate a COCO, Pascal VOC or YOLO dataset and summarise it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from detrkit.config import DataConfig
from detrkit.data.coco import CocoIndex, load_coco_index
from detrkit.data.errors import DatasetWarning
from detrkit.data.voc import voc_to_coco

__all__ = ["check_dataset", "check_splits"]


def check_splits(data: DataConfig) -> str:
    """Validate the train and val splits that ``data`` names (format coco / voc / yolo /
    auto, ``data.dataset`` or the explicit fields, ``data.rename`` applied) exactly as
    :func:`~detrkit.data.build.build_datasets` would, and return one report per split (see
    :func:`check_dataset`), the val split indexed with the train split's label map."""
    from detrkit.data.discover import resolve_splits
    from detrkit.data.formats import split_to_coco

    splits = resolve_splits(data)
    parts = [splits.note] if splits.note else []
    label_map = None
    for name, spec in (("train", splits.train), ("val", splits.val)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DatasetWarning)
            coco = split_to_coco(spec, data.rename, label_map)
            notes = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
            index = load_coco_index(
                coco.images_dir,
                coco.annotations_file,
                label_map=label_map or coco.label_map,
                source=coco.source,
            )
        label_map = index.label_map
        parts.append(f"== {name} ({splits.format})\n" + _report(index, coco.source))
        parts.extend(f"note:        {n}" for n in notes)
    return "\n".join(parts)


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


def _id_quirks(ids: list[int]) -> str:
    notes = []
    if 0 in ids:
        notes.append("id 0 is a class, not background")
    if ids and ids != list(range(ids[0], ids[0] + len(ids))):
        notes.append(f"sparse ids {ids[0]}..{ids[-1]}")
    return "; " + ", ".join(notes) if notes else ""


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
        f"in ascending id order{_id_quirks(index.label_map.category_ids)})",
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
