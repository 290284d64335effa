"""``detrkit convert-data``: write a dataset of one format in another (COCO or YOLO).

The source (COCO, VOC or YOLO; ``auto`` detects it) is read as training reads it
(:func:`~detrkit.data.discover.resolve_splits` and :func:`~detrkit.data.formats.split_to_coco`:
same validation, repairs and ``rename``), so what is written is what training would see: the
repaired, non-crowd boxes (crowd / VOC ``difficult`` boxes are left out and counted).

Layouts written (``<split>`` is ``train`` and ``val``):

* ``coco``: ``annotations/instances_<split>.json`` (absolute xywh boxes, the label map's
  category ids) and the images in ``<split>/``.
* ``yolo``: ``images/<split>/``, ``labels/<split>/*.txt`` (``class cx cy w h`` normalised to
  [0, 1], class = the contiguous index) and ``data.yaml`` (``train``, ``val``, ``names``).

Images are symlinked (absolute links) unless ``copy=True``; where a link cannot be made the
image is copied. Both layouts are found again by ``data.dataset`` discovery.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from detrkit.config import DataConfig
from detrkit.data.coco_index import CocoIndex, load_coco_index
from detrkit.data.discover import resolve_splits
from detrkit.data.errors import DatasetError, DatasetWarning
from detrkit.data.formats import split_to_coco
from detrkit.data.yolo import write_json

__all__ = ["convert_dataset"]


def _place(src: Path, dst: Path, copy: bool) -> bool:
    """Link (or copy) ``src`` to ``dst``; returns whether it was copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if not copy:
        try:
            os.symlink(src.resolve(), dst)
            return False
        except OSError:
            pass
    shutil.copy2(src, dst)
    return True


def _write_coco(index: CocoIndex, out: Path, split: str, copy: bool) -> int:
    images, anns, copied = [], [], 0
    ids = index.label_map.category_ids
    for r in index.records:
        copied += _place(r.path, out / split / r.file_name, copy)
        images.append(
            {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}
        )
        for (x0, y0, x1, y1), label in zip(r.boxes_xyxy.tolist(), r.labels.tolist()):
            w, h = x1 - x0, y1 - y0
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": r.image_id,
                    "category_id": ids[label],
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n} for i, n in zip(ids, index.label_map.names)]
    data = {"images": images, "annotations": anns, "categories": categories}
    write_json(out / "annotations" / f"instances_{split}.json", data)
    return copied


def _write_yolo(index: CocoIndex, out: Path, split: str, copy: bool) -> int:
    copied = 0
    for r in index.records:
        copied += _place(r.path, out / "images" / split / r.file_name, copy)
        lines = []
        for (x0, y0, x1, y1), label in zip(r.boxes_xyxy.tolist(), r.labels.tolist()):
            cx, cy = (x0 + x1) / 2 / r.width, (y0 + y1) / 2 / r.height
            w, h = (x1 - x0) / r.width, (y1 - y0) / r.height
            lines.append(f"{label} {cx:.8f} {cy:.8f} {w:.8f} {h:.8f}\n")
        label_file = (out / "labels" / split / r.file_name).with_suffix(".txt")
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text("".join(lines))
    return copied


def _yaml_text(names: list[str]) -> str:
    import yaml

    data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    return yaml.safe_dump(data, sort_keys=False)


def convert_dataset(
    src: str | Path,
    to: str,
    out: str | Path,
    *,
    format: str = "auto",
    rename: dict[str, str] | None = None,
    copy: bool = False,
) -> str:
    """Write the train and val splits of the dataset ``src`` (a folder, or a YOLO data.yaml;
    ``format``: coco / voc / yolo / auto) in format ``to`` (``coco`` or ``yolo``) under ``out``
    (see the module docstring). Returns a summary: what was written, whether images were
    linked or copied, and how many crowd boxes were left out."""
    if to not in ("coco", "yolo"):
        raise DatasetError(f"convert-data: --to must be coco or yolo, got '{to}'")
    out = Path(out)
    data = DataConfig(format=format, dataset=str(src), rename=dict(rename or {}))  # type: ignore[arg-type]
    splits = resolve_splits(data)
    lines = [splits.note] if splits.note else []
    label_map, copied, placed, crowd = None, 0, 0, 0
    for split, spec in (("train", splits.train), ("val", splits.val)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetWarning)
            coco = split_to_coco(spec, data.rename, label_map)
            index = load_coco_index(
                coco.images_dir, coco.annotations_file, label_map=label_map or coco.label_map
            )
        label_map = index.label_map
        write = _write_coco if to == "coco" else _write_yolo
        copied += write(index, out, split, copy)
        placed += len(index.records)
        crowd += sum(r.num_crowd for r in index.records)
        boxes = sum(len(r.labels) for r in index.records)
        lines.append(f"{split}: {len(index.records)} images, {boxes} boxes from {coco.source}")
    assert label_map is not None
    if to == "yolo":
        (out / "data.yaml").write_text(_yaml_text(list(label_map.names)))
    how = "copied" if copied == placed else "symlinked" if copied == 0 else "symlinked/copied"
    lines.append(
        f"wrote {to} dataset to {out} ({len(label_map)} classes; images {how}"
        + (f"; {crowd} crowd/difficult boxes left out" if crowd else "")
        + ")"
    )
    return "\n".join(lines)
