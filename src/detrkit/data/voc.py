"""Pascal VOC XML detection datasets, read through a COCO conversion.

:func:`voc_to_coco` converts a folder (or list) of VOC XML files into one COCO JSON, and
:class:`VocDetection` is a :class:`~detrkit.data.coco.CocoDetection` on that conversion, so
VOC data gets the same validation, repairs, targets, label map and COCO evaluation (the
evaluator reads the converted file, ``dataset.annotations_file``).

Conventions:

* coordinates: VOC pixel indices are 1-based and inclusive, so ``xmin=1, xmax=W`` spans the
  whole width: the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``.
* ``<filename>``: looked up in the image folder; when absent there, a file with the XML's or the
  filename's stem and a common image extension is used (XML files often name a ``.tif`` that was
  converted to ``.png``).
* ``<difficult>1</difficult>`` objects become ``iscrowd=1``: left out of training targets and
  ignored (neither true nor false positives) by the COCO evaluation.
* classes: ``rename`` maps names first (e.g. ``{"Alive": "Tree", "Dead": "Tree"}``); category
  ids are ``1..C`` in the order of ``class_names`` (default: the names found, sorted).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from detrkit.data.coco import CocoDetection
from detrkit.data.errors import DatasetError
from detrkit.data.transforms import DetectionTransform
from detrkit.structures import LabelMap

__all__ = ["VocObject", "VocAnnotation", "read_voc_xml", "voc_to_coco", "VocDetection"]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class VocObject:
    """One ``<object>``: class name, box as written (1-based inclusive pixels), difficult."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool


@dataclass
class VocAnnotation:
    """One VOC XML file. width / height: from ``<size>`` (None when absent)."""

    xml_path: Path
    filename: str
    width: int | None
    height: int | None
    objects: list[VocObject]


def _text(node: ET.Element, tag: str, xml_path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{xml_path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml_path: Path, where: str) -> float:
    text = _text(node, tag, xml_path, where)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml_path}: {where} <{tag}> is '{text}', not a number") from None


def read_voc_xml(xml_path: str | Path) -> VocAnnotation:
    """Parse one VOC XML file; malformed XML or missing fields raise a one-line
    :class:`DatasetError` naming the file (and line/column for XML syntax errors)."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as err:
        line, col = err.position
        raise DatasetError(f"{xml_path}: malformed XML at line {line} column {col}") from None
    if root.tag != "annotation":
        raise DatasetError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename", xml_path, "<annotation>")
    width = height = None
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_number(size, "width", xml_path, "<size>"))
        height = int(_number(size, "height", xml_path, "<size>"))
    objects = []
    for i, obj in enumerate(root.iter("object")):
        where = f"object {i + 1}"
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{xml_path}: {where} has no <bndbox>")
        difficult = obj.find("difficult")
        line = getattr(obj, "sourceline", None)
        xmin, ymin, xmax, ymax = (
            _number(box, tag, xml_path, f"{where} <bndbox>")
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        for lo, hi, axis in ((xmin, xmax, "x"), (ymin, ymax, "y")):
            if hi < lo:
                raise DatasetError(
                    f"{xml_path}: {where}{f' (line {line})' if line else ''} has "
                    f"{axis}max={hi:g} < {axis}min={lo:g}; fix or remove the box"
                )
        objects.append(
            VocObject(
                _text(obj, "name", xml_path, where),
                xmin,
                ymin,
                xmax,
                ymax,
                difficult=difficult is not None and (difficult.text or "").strip() == "1",
            )
        )
    return VocAnnotation(xml_path, filename, width, height, objects)


def _xml_files(annotations: str | Path | Sequence[str | Path]) -> list[Path]:
    """The XML files of a folder, one XML file, a ``.txt`` list of image ids (VOC ImageSets:
    ``<id>.xml`` in the ``Annotations`` folder beside ``ImageSets``, or beside the list), or a
    list of XML paths."""
    if isinstance(annotations, (str, Path)):
        path = Path(annotations)
        if path.suffix.lower() == ".txt" and path.is_file():
            return _listed_xml_files(path)
        if path.is_dir():
            files = sorted(path.glob("*.xml"))
            if not files:
                raise DatasetError(f"{path}: no .xml files in this folder")
            return files
        return [path]
    files = [Path(p) for p in annotations]
    if not files:
        raise DatasetError("voc_to_coco: no annotation files given")
    return files


def _listed_xml_files(list_file: Path) -> list[Path]:
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{list_file}: the list of image ids is empty")
    folders = [list_file.parent]
    if len(list_file.parents) > 2 and list_file.parents[1].name == "ImageSets":
        folders.insert(0, list_file.parents[2] / "Annotations")
    for folder in folders:
        if (folder / f"{ids[0]}.xml").is_file():
            missing = [i for i in ids if not (folder / f"{i}.xml").is_file()]
            if missing:
                raise DatasetError(
                    f"{list_file}: {len(missing)} listed ids have no XML in {folder} "
                    f"(first: {missing[0]})"
                )
            return [folder / f"{i}.xml" for i in ids]
    raise DatasetError(
        f"{list_file}: no '{ids[0]}.xml' for the first listed id (looked in "
        f"{', '.join(str(f) for f in folders)})"
    )


def _find_image(images_dir: Path, ann: VocAnnotation, fallbacks: list[str] | None = None) -> str:
    direct = images_dir / ann.filename
    if direct.is_file():
        return ann.filename
    for stem in dict.fromkeys([Path(ann.filename).stem, ann.xml_path.stem]):
        for ext in _IMAGE_EXTENSIONS:
            for candidate in (f"{stem}{ext}", f"{stem}{ext.upper()}"):
                if (images_dir / candidate).is_file():
                    if fallbacks is not None:
                        fallbacks.append(f"{ann.xml_path.name}: {ann.filename} -> {candidate}")
                    return candidate
    raise DatasetError(
        f"{ann.xml_path}: image '{ann.filename}' not found in {images_dir} "
        "(nor an image with the same stem)"
    )


def _coco_annotation(
    ann: VocAnnotation,
    obj: VocObject,
    rename: Mapping[str, str],
    category_of: Mapping[str, int],
    image_id: int,
    ann_id: int,
) -> dict:
    """One VOC object as a COCO annotation (absolute xywh from 1-based inclusive corners)."""
    name = rename.get(obj.name, obj.name)
    if name not in category_of:
        raise DatasetError(
            f"{ann.xml_path}: class '{name}' is not in class_names "
            f"{list(category_of)}; add it or map it with rename"
        )
    x0, y0 = obj.xmin - 1.0, obj.ymin - 1.0
    w, h = obj.xmax - x0, obj.ymax - y0
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_of[name],
        "bbox": [x0, y0, w, h],
        "area": max(w, 0.0) * max(h, 0.0),
        "iscrowd": int(obj.difficult),
    }


def voc_to_coco(
    images_dir: str | Path,
    annotations: str | Path | Sequence[str | Path],
    out_file: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
) -> LabelMap:
    """Convert VOC XML files (a folder of ``*.xml``, one file, or a list) whose images are in
    ``images_dir`` into the COCO JSON ``out_file`` (see the module docstring for the
    conventions). Returns the label map (category ids ``1..C``)."""
    images_dir = Path(images_dir)
    parsed = [read_voc_xml(p) for p in _xml_files(annotations)]
    rename = dict(rename or {})
    found = sorted({rename.get(o.name, o.name) for a in parsed for o in a.objects})
    names = list(class_names) if class_names is not None else found
    if len(set(names)) != len(names):
        raise DatasetError(f"voc_to_coco: class_names has duplicates: {names}")
    category_of = {name: i + 1 for i, name in enumerate(names)}
    images, anns = [], []
    fallbacks: list[str] = []
    for image_id, ann in enumerate(parsed, start=1):
        entry: dict = {"id": image_id, "file_name": _find_image(images_dir, ann, fallbacks)}
        if ann.width is not None and ann.height is not None:
            entry.update(width=ann.width, height=ann.height)
        images.append(entry)
        for obj in ann.objects:
            anns.append(_coco_annotation(ann, obj, rename, category_of, image_id, len(anns) + 1))
    info: dict = {"description": "converted from Pascal VOC XML by detrkit"}
    if fallbacks:  # reported by load_coco_index with its own repairs
        info["detrkit_repairs"] = [
            f"{len(fallbacks)} XML files name an image that is not in {images_dir}; used the "
            f"image with the same stem (first: {fallbacks[0]})"
        ]
    data = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for n, i in category_of.items()],
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out_file)
    return LabelMap(list(category_of.values()), list(category_of))


class VocDetection(CocoDetection):
    """A Pascal VOC dataset with the :class:`CocoDetection` contract (same targets, label
    map, validation and repairs). The XML files are converted to a COCO JSON first
    (:func:`voc_to_coco`); ``annotations_file`` is that conversion.

    annotations: a folder of ``*.xml``, one XML file, or a list of them. converted_file: where
    to write the COCO JSON (default: a file in the system temp folder named by a hash of the
    inputs). class_names / rename: see :func:`voc_to_coco`. label_map: class indices to use
    (e.g. the training set's); its names must match the converted category names.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path | Sequence[str | Path],
        transforms: DetectionTransform | None = None,
        *,
        train: bool,
        class_names: Sequence[str] | None = None,
        rename: Mapping[str, str] | None = None,
        label_map: LabelMap | None = None,
        converted_file: str | Path | None = None,
        check_image_sizes: bool = True,
    ) -> None:
        if label_map is not None and class_names is None:
            class_names = label_map.names
        if converted_file is None:
            key = json.dumps(
                [
                    str(Path(images_dir).resolve()),
                    [str(p.resolve()) for p in _xml_files(annotations)],
                    list(class_names or []),
                    sorted((rename or {}).items()),
                ]
            )
            digest = hashlib.sha1(key.encode()).hexdigest()[:16]
            converted_file = Path(tempfile.gettempdir()) / "detrkit-voc" / f"{digest}.json"
        converted = voc_to_coco(
            images_dir, annotations, converted_file, class_names=class_names, rename=rename
        )
        if label_map is not None and list(label_map.names) != converted.names:
            raise DatasetError(
                f"{converted_file}: class names {converted.names} differ from "
                f"the label map's {label_map.names}"
            )
        super().__init__(
            images_dir,
            converted_file,
            transforms,
            train=train,
            label_map=converted,
            check_image_sizes=check_image_sizes,
        )
