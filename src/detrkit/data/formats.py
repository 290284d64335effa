"""Every format as a COCO JSON: what training, check-data and the COCO evaluator read.

:func:`split_to_coco` converts one :class:`~detrkit.data.discover.SplitSpec` (COCO absolute
xywh boxes, VOC 1-based inclusive pixel corners, YOLO normalised cxcywh) into a COCO JSON in
a cache folder, applying ``data.rename`` (classes merged by name) and, for a validation
split, the training split's label map (categories matched by name, so that ids or names that
differ between the two files are either remapped, with a :class:`DatasetWarning`, or reported
as one :class:`DatasetError`). A COCO file that needs no change is used as it is.

:func:`dataset_classes` gives the training split's label map without reading any image.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from detrkit.config import DataConfig
from detrkit.data.coco_index import _categories, _read_json
from detrkit.data.discover import SplitSpec, resolve_splits
from detrkit.data.errors import DatasetError, DatasetWarning
from detrkit.data.voc import _xml_files, read_voc_xml, voc_to_coco
from detrkit.data.yolo import ids_by_name, list_images, merged_names, write_json, yolo_to_coco
from detrkit.structures import LabelMap

__all__ = ["CocoSplit", "split_to_coco", "split_classes", "dataset_classes"]


@dataclass
class CocoSplit:
    """A split as COCO: images folder, COCO JSON (the user's or a conversion), label map and
    the name of the user's files (for messages)."""

    images_dir: Path
    annotations_file: Path
    label_map: LabelMap
    source: str


def _cache_file(spec: SplitSpec, rename: Mapping[str, str], label_map: LabelMap | None) -> Path:
    key = json.dumps(
        [
            spec.format,
            str(spec.images.resolve()),
            str(spec.annotations.resolve()) if spec.annotations else None,
            sorted(rename.items()),
            label_map.to_json() if label_map is not None else None,
        ]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "detrkit-data" / f"{spec.format}-{digest}.json"


def _coco_map(
    file: Path, categories: list, rename: Mapping[str, str], label_map: LabelMap | None
) -> tuple[LabelMap, dict[int, int]]:
    """The label map of a COCO file after ``rename`` (merged categories take the smallest id)
    or ``label_map`` (matched by name), and the file's category id -> new id."""
    ids, names = _categories(file, categories)
    renamed = [rename.get(n, n) for n in names]
    if label_map is not None:
        id_of = ids_by_name(label_map, renamed, file)
        return label_map, {i: id_of[n] for i, n in zip(ids, renamed)}
    first: dict[str, int] = {}
    for i, n in zip(ids, renamed):
        first.setdefault(n, i)
    new = sorted(first.items(), key=lambda item: item[1])
    return LabelMap([i for _, i in new], [n for n, _ in new]), {
        i: first[n] for i, n in zip(ids, renamed)
    }


def _coco_split(spec: SplitSpec, rename: Mapping[str, str], label_map: LabelMap | None):
    file = Path(spec.annotations)  # type: ignore[arg-type]
    data = _read_json(file)
    new_map, id_map = _coco_map(file, data["categories"], rename, label_map)
    own = {c["id"]: c.get("name") for c in data["categories"]}
    target = dict(zip(new_map.category_ids, new_map.names))
    if all(a == b for a, b in id_map.items()) and own == target:
        return CocoSplit(spec.images, file, new_map, str(file))
    if label_map is not None and any(a != b for a, b in id_map.items()):
        warnings.warn(
            f"{file}: category ids differ from the training split's; matched by name",
            DatasetWarning,
            stacklevel=3,
        )
    for ann in data["annotations"]:
        if isinstance(ann, dict) and ann.get("category_id") in id_map:
            ann["category_id"] = id_map[ann["category_id"]]
    data["categories"] = [{"id": i, "name": n} for i, n in target.items()]
    out = _cache_file(spec, rename, label_map)
    write_json(out, data)
    return CocoSplit(spec.images, out, new_map, str(file))


def split_to_coco(
    spec: SplitSpec, rename: Mapping[str, str] | None = None, label_map: LabelMap | None = None
) -> CocoSplit:
    """Convert ``spec`` to COCO (see the module docstring). label_map: the training split's
    (for a validation split); default: the split's own classes."""
    rename = dict(rename or {})
    if spec.format == "coco":
        return _coco_split(spec, rename, label_map)
    out = _cache_file(spec, rename, label_map)
    if spec.format == "voc":
        annotations = spec.annotations if spec.annotations is not None else spec.images
        converted = voc_to_coco(
            spec.images,
            annotations,
            out,
            class_names=label_map.names if label_map is not None else None,
            rename=rename,
        )
        if label_map is not None:
            converted = label_map
        return CocoSplit(spec.images, out, converted, f"{annotations} (Pascal VOC)")
    if spec.format == "yolo":
        images = list_images(spec.images, spec.root)
        images_dir = spec.images if spec.images.is_dir() else (spec.root or spec.images.parent)
        outside = [p for p in images if not p.resolve().is_relative_to(images_dir.resolve())]
        if outside:
            raise DatasetError(f"{spec.images}: image {outside[0]} is outside {images_dir}")
        assert spec.names is not None
        converted = yolo_to_coco(
            images,
            images_dir,
            spec.names,
            out,
            labels_dir=spec.annotations,
            rename=rename,
            label_map=label_map,
        )
        return CocoSplit(images_dir, out, converted, f"{spec.images} (YOLO)")
    raise DatasetError(f"{spec.images}: unknown dataset format '{spec.format}'")


def split_classes(spec: SplitSpec, rename: Mapping[str, str] | None = None) -> LabelMap:
    """The label map :func:`split_to_coco` gives ``spec``, read from the annotations only (COCO
    categories, VOC object names, YOLO names); no image is opened."""
    rename = dict(rename or {})
    if spec.format == "coco":
        file = Path(spec.annotations)  # type: ignore[arg-type]
        return _coco_map(file, _read_json(file)["categories"], rename, None)[0]
    if spec.format == "voc":
        files = _xml_files(spec.annotations if spec.annotations is not None else spec.images)
        found = set()
        for f in files:
            try:
                root = ET.parse(f).getroot()
            except ET.ParseError:
                read_voc_xml(f)  # raises the one-line error
                raise
            found |= {(o.findtext("name") or "").strip() for o in root.iter("object")}
        names = sorted({rename.get(n, n) for n in found})
        return LabelMap(list(range(1, len(names) + 1)), names)
    assert spec.names is not None
    names = merged_names(spec.names, rename)
    return LabelMap(list(range(1, len(names) + 1)), names)


def dataset_classes(data: DataConfig) -> LabelMap:
    """The label map of the training split ``data`` names (any format but synthetic), the
    same as ``build_datasets(data)[0].label_map``, without decoding any image."""
    return split_classes(resolve_splits(data).train, data.rename)
