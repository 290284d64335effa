"""YOLO (Ultralytics) detection datasets, read through a COCO conversion.

Layout: ``images/<split>/x.jpg`` <-> ``labels/<split>/x.txt`` (the last ``images`` folder of
an image's path replaced by ``labels``; an image outside any ``images`` folder has its label
file beside it), and a ``data.yaml`` naming the classes (``names``: a list, or an
``{index: name}`` dict) and the splits (``train`` / ``val``: a folder of images or a ``.txt``
list of image paths, relative to ``path`` when the yaml has one, else to the yaml's folder).

Each label line is ``class cx cy w h``: the class index and the box in normalised cxcywh
(fractions of the image width / height, each in [0, 1]). Images without a label file, and
empty label files, are background (no boxes). A line with another number of values, a value
outside [0, 1] or an unknown class index is a :class:`DatasetError` naming the file and line.

:func:`yolo_to_coco` writes the COCO JSON (absolute xywh boxes) that training and the COCO
evaluator read; category ids are ``1..C`` in the order of the (renamed) names, unless a label
map (a training split's) gives them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detrkit.data.errors import DatasetError
from detrkit.data.images import read_image_size
from detrkit.structures import LabelMap

__all__ = [
    "IMAGE_EXTENSIONS",
    "YoloSpec",
    "read_data_yaml",
    "label_file_of",
    "list_images",
    "read_yolo_labels",
    "merged_names",
    "yolo_to_coco",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_TOLERANCE = 1e-6  # normalised values this far outside [0, 1] are accepted (float rounding)


@dataclass
class YoloSpec:
    """A ``data.yaml``: the dataset root, class names (index order) and split sources
    (``None`` when the yaml has no such entry)."""

    yaml_file: Path
    root: Path
    names: list[str]
    train: Path | None
    val: Path | None


def read_data_yaml(path: str | Path) -> YoloSpec:
    """Read a YOLO ``data.yaml`` (see the module docstring); a missing file, bad YAML or a
    missing / malformed ``names`` raise a one-line :class:`DatasetError` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: YOLO data.yaml not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{path}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names', 'train' and 'val'")
    names = data.get("names")
    if names is None:
        raise DatasetError(
            f"{path}: no 'names'; add the class names, e.g. 'names: [car, person]' or "
            "'names: {0: car, 1: person}'"
        )
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: 'names' keys must be class indices 0..C-1") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{path}: 'names' indices must be 0..{len(keys) - 1}, got {keys}")
        by_index = {int(k): v for k, v in names.items()}
        names = [by_index[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list or {{index: name}} dict")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{path}: 'nc' is {nc} but 'names' lists {len(names)} classes")
    root = path.parent
    if data.get("path"):
        root = Path(str(data["path"]))
        if not root.is_absolute():
            root = path.parent / root
    if not root.is_dir():
        raise DatasetError(f"{path}: dataset folder 'path: {data.get('path')}' not found")

    def split(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, list):
            if len(value) != 1:
                raise DatasetError(f"{path}: '{key}' lists {len(value)} sources; give one")
            value = value[0]
        p = Path(str(value))
        return p if p.is_absolute() else root / p

    return YoloSpec(path, root, [str(n) for n in names], split("train"), split("val"))


def list_images(source: str | Path, root: str | Path | None = None) -> list[Path]:
    """The images of a split: every image file under the folder ``source`` (recursively,
    sorted), or the paths listed in the ``.txt`` file ``source`` (one per line; relative lines
    resolved against the list's folder, then ``root``)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise DatasetError(f"{source}: no image files in this folder")
        return files
    if source.suffix.lower() == ".txt" and source.is_file():
        files = []
        for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            p = Path(line)
            candidates = [p] if p.is_absolute() else [source.parent / p]
            if root is not None and not p.is_absolute():
                candidates.append(Path(root) / p)
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise DatasetError(f"{source}: line {lineno}: image '{line}' not found")
            files.append(found)
        if not files:
            raise DatasetError(f"{source}: the image list is empty")
        return files
    raise DatasetError(f"{source}: not found (expected a folder of images or a .txt list)")


def label_file_of(image: Path, labels_dir: Path | None = None, images_dir: Path | None = None):
    """The label ``.txt`` of ``image``: in ``labels_dir`` (same relative path as under
    ``images_dir``) when given, else the Ultralytics rule (last ``images`` folder ->
    ``labels``; beside the image when its path has no ``images`` folder)."""
    if labels_dir is not None:
        rel = image.relative_to(images_dir) if images_dir is not None else Path(image.name)
        return (labels_dir / rel).with_suffix(".txt")
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def read_yolo_labels(label_file: str | Path, num_classes: int) -> np.ndarray:
    """``[N, 5]`` float64 rows ``(class, cx, cy, w, h)`` (normalised cxcywh) of a label file;
    a missing or empty file gives ``[0, 5]`` (background). Bad lines raise a
    :class:`DatasetError` naming the file and line."""
    label_file = Path(label_file)
    if not label_file.is_file():
        return np.zeros((0, 5))
    rows = []
    for lineno, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}: line {lineno}"
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: {len(fields)} values; expected 5 ('class cx cy w h', box normalised "
                "to [0, 1])"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: '{line.strip()}' is not five numbers") from None
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DatasetError(
                f"{where}: class index {fields[0]} is not one of the {num_classes} classes "
                f"0..{num_classes - 1} in data.yaml 'names'"
            )
        for name, v in zip(("cx", "cy", "w", "h"), values[1:]):
            if not math.isfinite(v) or not -_TOLERANCE <= v <= 1 + _TOLERANCE:
                raise DatasetError(
                    f"{where}: {name}={fields[1 + ('cx', 'cy', 'w', 'h').index(name)]} is "
                    "outside [0, 1]; YOLO boxes are normalised by the image width/height"
                )
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def merged_names(names: Sequence[str], rename: Mapping[str, str] | None) -> list[str]:
    """The class names after ``rename``, duplicates merged, in order of first appearance."""
    rename = dict(rename or {})
    return list(dict.fromkeys(rename.get(n, n) for n in names))


def ids_by_name(label_map: LabelMap, names: Sequence[str], where: Path) -> dict[str, int]:
    """Category id of each of ``names`` in ``label_map`` (a training split's); a name the
    map lacks is one :class:`DatasetError` naming ``where``."""
    id_of_name = dict(zip(label_map.names, label_map.category_ids))
    missing = [n for n in names if n not in id_of_name]
    if missing:
        raise DatasetError(
            f"{where}: classes {missing} are not among the training split's classes "
            f"{label_map.names}; map them with data.rename"
        )
    return id_of_name


def yolo_to_coco(
    images: Sequence[Path],
    images_dir: Path,
    names: Sequence[str],
    out_file: str | Path,
    *,
    labels_dir: Path | None = None,
    rename: Mapping[str, str] | None = None,
    label_map: LabelMap | None = None,
) -> LabelMap:
    """Convert the YOLO labels of ``images`` (paths under ``images_dir``; ``file_name`` in the
    JSON is relative to it) into the COCO JSON ``out_file`` (absolute xywh boxes, image sizes
    read from the image headers). names: the class names of the label indices. rename: merge /
    rename classes. label_map: category ids and names to use (a training split's); default
    ids ``1..C`` in the order of the renamed names. Returns the label map."""
    rename = dict(rename or {})
    final = merged_names(names, rename)
    if label_map is None:
        label_map = LabelMap(list(range(1, len(final) + 1)), final)
    id_of_name = ids_by_name(label_map, final, images_dir)
    id_of_index = [id_of_name[rename.get(n, n)] for n in names]
    entries, anns = [], []
    for image_id, image in enumerate(images, start=1):
        height, width = read_image_size(image)
        rel = os.path.relpath(image, images_dir)
        entries.append({"id": image_id, "file_name": rel, "width": width, "height": height})
        rows = read_yolo_labels(label_file_of(image, labels_dir, images_dir), len(names))
        for cls, cx, cy, w, h in rows.tolist():
            bw, bh = w * width, h * height
            x, y = cx * width - bw / 2, cy * height - bh / 2
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": id_of_index[int(cls)],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    write_json(
        out_file,
        {
            "info": {"description": "converted from YOLO labels by detrkit"},
            "images": entries,
            "annotations": anns,
            "categories": [
                {"id": c, "name": n} for c, n in zip(label_map.category_ids, label_map.names)
            ],
        },
    )
    return label_map


def write_json(out_file: str | Path, data: dict) -> None:
    """Write ``data`` to ``out_file`` atomically (a temporary file, then a rename)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out_file)
