"""The index of a COCO-JSON detection dataset, validated when it loads.

:func:`load_coco_index` reads and checks an annotation file against its image folder once, at
construction, so that a broken dataset fails with a one-line :class:`DatasetError` naming the
file and the problem before any training starts. Repairable problems are repaired, each kind
reported by one :class:`DatasetWarning` naming the file and counting the cases:

* fatal (``DatasetError``): missing file, malformed JSON (line and column), missing
  ``images`` / ``annotations`` / ``categories``, malformed entries (ids that are not integers,
  a ``bbox`` that is not four finite numbers), duplicate image, category or annotation ids,
  no categories,
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

from detrkit.data.errors import DatasetError, DatasetWarning
from detrkit.data.images import read_image_size
from detrkit.structures import LabelMap

__all__ = ["ImageRecord", "CocoIndex", "load_coco_index"]

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
        raise DatasetError(
            f"{file}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{file}: expected a JSON object with 'images', 'annotations' and "
            f"'categories' at the top level, got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(
                f"{file}: missing required key '{key}' (a COCO detection file "
                "needs 'images', 'annotations' and 'categories')"
            )
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
        raise DatasetError(
            f"{file}: 'categories' is empty; a detection dataset needs at least one category"
        )
    ids.sort()
    return ids, [names[c] for c in ids]


def _bbox(file: Path, ann: dict, where: str) -> tuple[float, float, float, float]:
    box = ann.get("bbox")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        or not all(math.isfinite(v) for v in box)
    ):
        raise DatasetError(
            f"{file}: {where} has bbox {box!r}; expected [x, y, width, height] "
            "(four finite numbers)"
        )
    x, y, w, h = (float(v) for v in box)
    return x, y, w, h


def _image_records(
    file: Path, images_dir: Path, entries: list
) -> tuple[dict[int, ImageRecord], dict[int, tuple[int | None, int | None]]]:
    """Parse ``images``: one empty record per image id (sizes still 0), and the height and width
    the JSON gives for each (``None`` where it gives none)."""
    records: dict[int, ImageRecord] = {}
    json_sizes: dict[int, tuple[int | None, int | None]] = {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        image_id = _int_field(file, entry, where, "id")
        assert image_id is not None
        if image_id in records:
            raise DatasetError(f"{file}: image id {image_id} appears twice in 'images'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{file}: {where} (id {image_id}) has no 'file_name'")
        json_sizes[image_id] = (
            _int_field(file, entry, where, "height", required=False),
            _int_field(file, entry, where, "width", required=False),
        )
        records[image_id] = ImageRecord(
            image_id,
            name,
            images_dir / name,
            0,
            0,
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int64),
        )
    return records, json_sizes


def _check_files_exist(file: Path, images_dir: Path, records: dict[int, ImageRecord]) -> None:
    """Every image file is checked; the count and the first missing one are named."""
    missing = [r.file_name for r in records.values() if not os.path.isfile(r.path)]
    if missing:
        raise DatasetError(
            f"{file}: {len(missing)} of {len(records)} image files are missing "
            f"from {images_dir} (first: {missing[0]})"
        )


def _set_image_sizes(
    records: dict[int, ImageRecord],
    json_sizes: dict[int, tuple[int | None, int | None]],
    check_image_sizes: bool,
) -> _Problems:
    """Give every record its height and width: from the file's header with
    ``check_image_sizes`` or when the JSON lacks them, else from the JSON. Returns the images
    whose JSON size disagreed with the file (the file's size is used)."""
    size_fix = _Problems(
        "{n} images have a width/height different from the image file; using the file's size"
    )
    for record in records.values():
        json_h, json_w = json_sizes[record.image_id]
        if check_image_sizes or json_h is None or json_w is None:
            record.height, record.width = read_image_size(record.path)
            record.size_checked = True
            if (
                json_h is not None
                and json_w is not None
                and (json_h, json_w) != (record.height, record.width)
            ):
                size_fix.add(
                    f"{record.file_name}: JSON {json_w}x{json_h}, file "
                    f"{record.width}x{record.height}"
                )
        else:
            record.height, record.width = json_h, json_w
    return size_fix


class _Annotations:
    """Checks the ``annotations`` of ``file`` against its images and categories and collects
    their repaired, non-crowd boxes per image (absolute xyxy, clipped to the image) with their
    class indices in ``label_map``."""

    def __init__(
        self,
        file: Path,
        records: dict[int, ImageRecord],
        known_categories: dict[int, str],
        label_map: LabelMap,
    ) -> None:
        self.file, self.records = file, records
        self.known_categories, self.label_map = known_categories, label_map
        self.index_of = {cid: i for i, cid in enumerate(label_map.category_ids)}
        self.non_positive = _Problems(
            "dropped {n} annotations with non-positive box width or height"
        )
        self.clipped = _Problems("clipped {n} boxes extending outside their image")
        self.outside = _Problems("dropped {n} boxes lying entirely outside their image")
        self.seen_ids: set[int] = set()
        self.boxes: dict[int, list[list[float]]] = {i: [] for i in records}
        self.labels: dict[int, list[int]] = {i: [] for i in records}

    @property
    def problems(self) -> tuple[_Problems, ...]:
        return self.non_positive, self.clipped, self.outside

    def _ids(self, i: int, ann: Any) -> tuple[str, int, int]:
        """``(where, image_id, category_id)`` of ``annotations[i]``, both ids checked to be
        known (the category also to be in the label map)."""
        file = self.file
        image_id = _int_field(file, ann, f"annotations[{i}]", "image_id")
        ann_id = ann.get("id")
        where = f"annotation id {ann_id}" if ann_id is not None else f"annotations[{i}]"
        category_id = _int_field(file, ann, where, "category_id")
        if image_id not in self.records:
            raise DatasetError(
                f"{file}: {where} refers to image_id {image_id}, which is not in 'images'"
            )
        if category_id not in self.known_categories:
            raise DatasetError(
                f"{file}: {where} refers to category_id {category_id}, which is not in 'categories'"
            )
        if category_id not in self.index_of:
            raise DatasetError(
                f"{file}: {where} has category_id {category_id} "
                f"('{self.known_categories[category_id]}'), which is not in the "
                f"label map {self.label_map.category_ids}"
            )
        assert image_id is not None and category_id is not None
        return where, image_id, category_id

    def add(self, i: int, ann: Any) -> None:
        """Check ``annotations[i]`` and keep its box unless it is crowd or dropped."""
        where, image_id, category_id = self._ids(i, ann)
        ann_id = ann.get("id")
        if isinstance(ann_id, int):
            if ann_id in self.seen_ids:
                raise DatasetError(
                    f"{self.file}: annotation id {ann_id} appears twice in 'annotations' "
                    "(annotation ids must be unique; renumber them)"
                )
            self.seen_ids.add(ann_id)
        x, y, w, h = _bbox(self.file, ann, where)
        record = self.records[image_id]
        if ann.get("iscrowd", 0):
            record.num_crowd += 1
            return
        if w <= 0 or h <= 0:
            self.non_positive.add(f"{where}, bbox {[x, y, w, h]}")
            return
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(record.width)), min(y + h, float(record.height))
        if x1 <= x0 or y1 <= y0:
            self.outside.add(f"{where} in {record.file_name}")
            return
        excess = max(x0 - x, y0 - y, x + w - x1, y + h - y1)
        if excess > _CLIP_TOLERANCE:
            self.clipped.add(f"{where} in {record.file_name}")
        self.boxes[image_id].append([x0, y0, x1, y1])
        self.labels[image_id].append(self.index_of[category_id])

    def store(self) -> None:
        """Write the kept boxes into the records as ``[N, 4]`` float32 / ``[N]`` int64."""
        for image_id, record in self.records.items():
            if self.boxes[image_id]:
                record.boxes_xyxy = np.asarray(self.boxes[image_id], dtype=np.float32)
                record.labels = np.asarray(self.labels[image_id], dtype=np.int64)


def load_coco_index(
    images_dir: str | Path,
    annotations_file: str | Path,
    *,
    label_map: LabelMap | None = None,
    check_image_sizes: bool = True,
    source: str | None = None,
) -> CocoIndex:
    """Read and validate a COCO annotation file and its image folder (see the module docstring).

    label_map: map categories to these class indices (a validation set uses the training
    set's map); default: the file's categories sorted by id -> ``0 .. C-1``.
    check_image_sizes: read every image header to compare with the JSON's width/height (a
    header read per image; images are also checked when they are read). source: the name of
    the user's files in repair messages when ``annotations_file`` is a conversion of them (the
    conversion's own repairs, ``info.detrkit_repairs`` in the JSON, are reported too).
    """
    file, images_dir = Path(annotations_file), Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: image folder not found (images of {file})")
    data = _read_json(file)

    cat_ids, cat_names = _categories(file, data["categories"])
    known_categories = dict(zip(cat_ids, cat_names))
    if label_map is None:
        label_map = LabelMap(cat_ids, cat_names)

    records, json_sizes = _image_records(file, images_dir, data["images"])
    _check_files_exist(file, images_dir, records)
    size_fix = _set_image_sizes(records, json_sizes, check_image_sizes)
    annotations = _Annotations(file, records, known_categories, label_map)
    for i, ann in enumerate(data["annotations"]):
        annotations.add(i, ann)
    annotations.store()

    info = data.get("info")
    repairs = []
    noted = info.get("detrkit_repairs", []) if isinstance(info, dict) else []
    messages: list[str | None] = [f"{source or file}: {m}" for m in noted]
    for problem in (size_fix, *annotations.problems):
        messages.append(problem.message(Path(source) if source else file))
    for message in messages:
        if message is not None:
            warnings.warn(message, DatasetWarning, stacklevel=3)
            repairs.append(message)
    return CocoIndex(
        file, images_dir, list(records.values()), label_map, len(data["annotations"]), repairs
    )
