"""COCO-JSON detection datasets, validated when they load.

:func:`load_coco_index` reads and checks an annotation file against its image folder once, at
construction, so that a broken dataset fails with a one-line :class:`DatasetError` naming the
file and the problem before any training starts. Repairable problems are repaired, each kind
reported by one :class:`DatasetWarning` naming the file and counting the cases:

* fatal (``DatasetError``): missing file, malformed JSON (line and column), missing
  ``images`` / ``annotations`` / ``categories``, malformed entries (ids that are not integers,
  a ``bbox`` that is not four finite numbers), duplicate image or category ids, no categories,
  an annotation pointing at an unknown image id or category id, image files missing from the
  folder (all are checked; the first missing one and the count are named), unreadable images.
* repaired (``DatasetWarning``): boxes with non-positive width or height are dropped; boxes
  extending outside their image are clipped to it (excesses up to 1 pixel, float rounding,
  are clipped silently) and boxes entirely outside are dropped; an image whose width/height
  in the JSON disagree with the file uses the file's size.

Crowd annotations (``iscrowd=1``) are never part of the targets; they stay in the JSON file,
which the evaluator reads itself.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from detrkit.data.errors import DatasetError, DatasetWarning
from detrkit.data.images import read_image, read_image_size
from detrkit.data.transforms import DetectionTransform
from detrkit.structures import LabelMap, Target

__all__ = ["ImageRecord", "CocoIndex", "load_coco_index", "CocoDetection"]

_CLIP_TOLERANCE = 1.0  # pixels beyond the image edge clipped without a warning


@dataclass
class ImageRecord:
    """One image and its (repaired, non-crowd) boxes.

    boxes_xyxy: ``[N, 4]`` float32 absolute pixels, inside ``(height, width)``.
    labels: ``[N]`` int64 contiguous class indices. num_crowd: crowd annotations left out.
    """

    image_id: int
    file_name: str
    path: Path
    height: int
    width: int
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    num_crowd: int = 0
    size_checked: bool = False


@dataclass
class CocoIndex:
    """What :func:`load_coco_index` learned from an annotation file.

    repairs: the warning messages issued (one per kind of repair). num_annotations: entries in
    the file's ``annotations`` list (crowd and dropped ones included).
    """

    annotations_file: Path
    images_dir: Path
    records: list[ImageRecord]
    label_map: LabelMap
    num_annotations: int
    repairs: list[str] = field(default_factory=list)


class _Problems:
    """Counts one kind of repair and remembers its first case."""

    def __init__(self, what: str) -> None:
        self.what, self.count, self.first = what, 0, ""

    def add(self, case: str) -> None:
        if self.count == 0:
            self.first = case
        self.count += 1

    def message(self, file: Path) -> str | None:
        if self.count == 0:
            return None
        return f"{file}: {self.what.format(n=self.count)} (first: {self.first})"


def _read_json(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{file}: annotation file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{file}: is a folder, expected a COCO JSON file") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{file}: malformed JSON at line {err.lineno} column {err.colno}: "
                           f"{err.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{file}: expected a JSON object with 'images', 'annotations' and "
                           f"'categories' at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{file}: missing required key '{key}' (a COCO detection file "
                               "needs 'images', 'annotations' and 'categories')")
        if not isinstance(data[key], list):
            raise DatasetError(f"{file}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _int_field(file: Path, entry: Any, where: str, key: str, required: bool = True) -> int | None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{file}: {where} must be an object, got {type(entry).__name__}")
    if key not in entry or entry[key] is None:
        if required:
            raise DatasetError(f"{file}: {where} has no '{key}'")
        return None
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DatasetError(f"{file}: {where}.{key} must be an integer, got {value!r}")
    return value


def _categories(file: Path, entries: list) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    names: dict[int, str] = {}
    for i, entry in enumerate(entries):
        cid = _int_field(file, entry, f"categories[{i}]", "id")
        assert cid is not None
        if cid in names:
            raise DatasetError(f"{file}: category id {cid} appears twice in 'categories'")
        names[cid] = str(entry.get("name", f"category_{cid}"))
        ids.append(cid)
    if not ids:
        raise DatasetError(f"{file}: 'categories' is empty; a detection dataset needs at least "
                           "one category")
    ids.sort()
    return ids, [names[c] for c in ids]


def _bbox(file: Path, ann: dict, where: str) -> tuple[float, float, float, float]:
    box = ann.get("bbox")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or not all(math.isfinite(v) for v in box)):
        raise DatasetError(f"{file}: {where} has bbox {box!r}; expected [x, y, width, height] "
                           "(four finite numbers)")
    x, y, w, h = (float(v) for v in box)
    return x, y, w, h


def load_coco_index(images_dir: str | Path, annotations_file: str | Path, *,
                    label_map: LabelMap | None = None,
                    check_image_sizes: bool = True) -> CocoIndex:
    """Read and validate a COCO annotation file and its image folder (see the module docstring).

    label_map: map categories to these class indices (a validation set uses the training
    set's map); default: the file's categories sorted by id -> ``0 .. C-1``.
    check_image_sizes: read every image header to compare with the JSON's width/height (a
    header read per image; images are also checked when they are read).
    """
    file, images_dir = Path(annotations_file), Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: image folder not found (images of {file})")
    data = _read_json(file)

    cat_ids, cat_names = _categories(file, data["categories"])
    known_categories = dict(zip(cat_ids, cat_names))
    if label_map is None:
        label_map = LabelMap(cat_ids, cat_names)
    index_of = {cid: i for i, cid in enumerate(label_map.category_ids)}

    records: dict[int, ImageRecord] = {}
    json_sizes: dict[int, tuple[int | None, int | None]] = {}
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = _int_field(file, entry, where, "id")
        assert image_id is not None
        if image_id in records:
            raise DatasetError(f"{file}: image id {image_id} appears twice in 'images'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{file}: {where} (id {image_id}) has no 'file_name'")
        json_sizes[image_id] = (_int_field(file, entry, where, "height", required=False),
                                _int_field(file, entry, where, "width", required=False))
        records[image_id] = ImageRecord(image_id, name, images_dir / name, 0, 0,
                                        np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))

    missing = [r.file_name for r in records.values() if not os.path.isfile(r.path)]
    if missing:
        raise DatasetError(f"{file}: {len(missing)} of {len(records)} image files are missing "
                           f"from {images_dir} (first: {missing[0]})")

    size_fix = _Problems("{n} images have a width/height different from the image file; "
                         "using the file's size")
    for record in records.values():
        json_h, json_w = json_sizes[record.image_id]
        if check_image_sizes or json_h is None or json_w is None:
            record.height, record.width = read_image_size(record.path)
            record.size_checked = True
            if json_h is not None and json_w is not None and (json_h, json_w) != (
                    record.height, record.width):
                size_fix.add(f"{record.file_name}: JSON {json_w}x{json_h}, file "
                             f"{record.width}x{record.height}")
        else:
            record.height, record.width = json_h, json_w

    non_positive = _Problems("dropped {n} annotations with non-positive box width or height")
    clipped = _Problems("clipped {n} boxes extending outside their image")
    outside = _Problems("dropped {n} boxes lying entirely outside their image")
    boxes: dict[int, list[list[float]]] = {i: [] for i in records}
    labels: dict[int, list[int]] = {i: [] for i in records}
    for i, ann in enumerate(data["annotations"]):
        image_id = _int_field(file, ann, f"annotations[{i}]", "image_id")
        ann_id = ann.get("id")
        where = f"annotation id {ann_id}" if ann_id is not None else f"annotations[{i}]"
        category_id = _int_field(file, ann, where, "category_id")
        if image_id not in records:
            raise DatasetError(f"{file}: {where} refers to image_id {image_id}, which is not "
                               "in 'images'")
        if category_id not in known_categories:
            raise DatasetError(f"{file}: {where} refers to category_id {category_id}, which "
                               "is not in 'categories'")
        if category_id not in index_of:
            raise DatasetError(f"{file}: {where} has category_id {category_id} "
                               f"('{known_categories[category_id]}'), which is not in the "
                               f"label map {label_map.category_ids}")
        x, y, w, h = _bbox(file, ann, where)
        record = records[image_id]
        if ann.get("iscrowd", 0):
            record.num_crowd += 1
            continue
        if w <= 0 or h <= 0:
            non_positive.add(f"{where}, bbox {[x, y, w, h]}")
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(record.width)), min(y + h, float(record.height))
        if x1 <= x0 or y1 <= y0:
            outside.add(f"{where} in {record.file_name}")
            continue
        excess = max(x0 - x, y0 - y, x + w - x1, y + h - y1)
        if excess > _CLIP_TOLERANCE:
            clipped.add(f"{where} in {record.file_name}")
        boxes[image_id].append([x0, y0, x1, y1])
        labels[image_id].append(index_of[category_id])

    for image_id, record in records.items():
        if boxes[image_id]:
            record.boxes_xyxy = np.asarray(boxes[image_id], dtype=np.float32)
            record.labels = np.asarray(labels[image_id], dtype=np.int64)

    repairs = []
    for problem in (size_fix, non_positive, clipped, outside):
        message = problem.message(file)
        if message is not None:
            warnings.warn(message, DatasetWarning, stacklevel=3)
            repairs.append(message)
    return CocoIndex(file, images_dir, list(records.values()), label_map,
                     len(data["annotations"]), repairs)


def clip_to_size(boxes_xyxy: np.ndarray, labels: np.ndarray, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``[N, 4]`` absolute xyxy boxes to ``height x width``; drop those left empty."""
    clipped = boxes_xyxy.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], labels[keep]


class CocoDetection(Dataset):
    """A COCO-JSON detection dataset: ``dataset[i] -> (image, target)``.

    image: ``[3, H, W]`` float tensor (normalised when ``transforms`` normalise; with
    ``transforms=None`` the image as read, in [0, 1]). target: :class:`Target` with boxes
    ``[N, 4]`` normalised cxcywh relative to the transformed image, labels ``[N]`` int64
    contiguous (category ids sorted ascending -> ``0 .. C-1``, see ``label_map``), image_id
    the COCO id, orig_size ``(h, w)`` on disk, size ``(h, w)`` after transforms. Images without
    annotations give empty targets (``[0, 4]`` / ``[0]``). Crowd boxes are never in targets.

    Validation and repairs happen at construction (:func:`load_coco_index`): bad input raises
    :class:`DatasetError`; boxes with non-positive width/height are dropped, boxes outside the
    image clipped (or dropped when entirely outside) and JSON sizes that disagree with the
    files replaced by the files' sizes, each with a :class:`DatasetWarning` counting the cases.

    train: whether this is a training split (recorded as ``self.train``; targets are built the
    same way in both cases). label_map: use this class mapping (e.g. the training set's)
    instead of the file's own. check_image_sizes: see :func:`load_coco_index`.
    """

    def __init__(self, images_dir: str | Path, annotations_file: str | Path,
                 transforms: DetectionTransform | None = None, *, train: bool,
                 label_map: LabelMap | None = None, check_image_sizes: bool = True) -> None:
        self.index = load_coco_index(images_dir, annotations_file, label_map=label_map,
                                     check_image_sizes=check_image_sizes)
        self.images_dir = self.index.images_dir
        self.annotations_file = self.index.annotations_file
        self.label_map = self.index.label_map
        self.image_ids = [r.image_id for r in self.index.records]
        self.transforms = transforms if transforms is not None else DetectionTransform([])
        self.train = train

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        record = self.index.records[i]
        image = read_image(record.path)
        boxes, labels = record.boxes_xyxy, record.labels
        if (image.height, image.width) != (record.height, record.width):
            warnings.warn(f"{self.annotations_file}: image {record.file_name} is "
                          f"{image.width}x{image.height} on disk, not {record.width}x"
                          f"{record.height} as in the JSON; clipping its boxes to the file's "
                          "size", DatasetWarning, stacklevel=2)
            boxes, labels = clip_to_size(boxes, labels, image.height, image.width)
        out = self.transforms(image, torch.from_numpy(boxes), torch.from_numpy(labels))
        assert out.boxes_cxcywh is not None and out.labels is not None
        size = (int(out.image.shape[-2]), int(out.image.shape[-1]))
        target = Target(out.boxes_cxcywh, out.labels, record.image_id, size,
                        (image.height, image.width))
        return out.image, target
