"""Cutting large images (aerial, medical, documents) into overlapping square tiles.

:func:`tile_windows` gives the tile windows of one image size; :func:`tile_coco` turns a COCO
split (image folder + COCO JSON) into a tiled COCO split written to a cache folder, which
:class:`~detrkit.data.coco.CocoDetection` reads like any other split; :func:`check_tile_config`
validates the ``data.tiles`` settings with one-line errors naming the field.

Conventions:

* windows are ``(x0, y0, x1, y1)`` integer pixels, absolute xyxy in the source image, ``x1`` /
  ``y1`` exclusive. Along each axis the first window starts at 0, the next ones every
  ``stride = floor(size * (1 - overlap))`` pixels, and the last one is flush with the right /
  bottom edge (so it may share more than ``overlap`` with its neighbour). A side shorter than
  ``size`` is one window spanning it: tiles are never padded nor upscaled.
* boxes: COCO absolute ``[x, y, w, h]``, in and out. A source box is first clipped to its image
  (as :func:`~detrkit.data.coco_index.load_coco_index` repairs it); boxes with non-positive
  width or height are dropped. In a tile it is clipped to the window and kept when
  ``clipped area / area >= min_visibility`` (and the clipped area is positive). Crowd boxes
  (``iscrowd=1``, ignore regions for the evaluator) are kept, clipped, whenever they overlap
  the tile. Segmentations are not carried over.
* empty tiles (no non-crowd box): ``round(empty_ratio * tiles with boxes)`` of them are kept,
  drawn with ``random.Random(seed)``; ``all_tiles=True`` keeps every tile (for evaluation).
* every image entry of the tiled JSON records its origin:
  ``"tile": {"source": file_name, "source_id": id, "x0", "y0", "x1", "y1"}``.
* cache: ``<cache root>/<digest>/images/*.png`` + ``annotations.json``; the digest covers the
  annotation file's bytes, the source images' names, sizes and modification times, and the
  settings. The JSON is written last (temp name + ``os.replace``), so its presence means the
  cache is complete; a complete cache is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from detrkit.config import ConfigError, TileConfig
from detrkit.config.data_rules import check_tile_config
from detrkit.data.coco_index import load_coco_index
from detrkit.data.images import read_image

__all__ = ["check_tile_config", "tile_windows", "clip_box_to_window", "tile_coco"]

_FORMAT_VERSION = 1  # part of the cache digest: bump when the tiled output changes


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis of ``length`` pixels (the last flush with the end)."""
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def tile_windows(
    width: int, height: int, size: int, overlap: float
) -> list[tuple[int, int, int, int]]:
    """The tile windows covering a ``width x height`` image: ``(x0, y0, x1, y1)`` absolute
    integer pixels (``x1``, ``y1`` exclusive), row by row (see the module docstring).

    Neighbouring windows share at least ``overlap * size`` pixels (rounded down to whole
    pixels); a window is ``size`` wide unless the image is narrower (then it is the image's
    width), likewise for the height."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tile size: must be a positive integer, got {size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap: must be in [0, 1), got {overlap!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image size: must be positive, got {width}x{height}")
    stride = max(1, math.floor(size * (1.0 - overlap) + 1e-9))
    return [
        (x0, y0, min(x0 + size, width), min(y0 + size, height))
        for y0 in _starts(height, size, stride)
        for x0 in _starts(width, size, stride)
    ]


def clip_box_to_window(
    box_xywh: Iterable[float], window: tuple[int, int, int, int]
) -> tuple[list[float], float] | None:
    """Clip a COCO absolute ``[x, y, w, h]`` box (image pixels) to ``window`` (absolute xyxy).

    Returns ``([x, y, w, h] relative to the window's origin, visible fraction)`` where the
    fraction is clipped area / box area, or None when nothing of the box is inside."""
    x, y, w, h = (float(v) for v in box_xywh)
    wx0, wy0, wx1, wy1 = window
    x0, y0 = max(x, wx0), max(y, wy0)
    x1, y1 = min(x + w, wx1), min(y + h, wy1)
    if x1 <= x0 or y1 <= y0 or w <= 0 or h <= 0:
        return None
    visible = (x1 - x0) * (y1 - y0) / (w * h)
    return [x0 - wx0, y0 - wy0, x1 - x0, y1 - y0], min(visible, 1.0)


@dataclass
class _Tile:
    """One candidate tile: its source image, window and the annotations kept in it."""

    source_id: int
    source_name: str
    window: tuple[int, int, int, int]
    annotations: list[dict]
    file_name: str = ""

    @property
    def has_boxes(self) -> bool:
        return any(not a["iscrowd"] for a in self.annotations)


def _digest(annotations_file: Path, images_dir: Path, records, settings: dict) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([_FORMAT_VERSION, str(images_dir.resolve()), settings]).encode())
    h.update(annotations_file.read_bytes())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{r.file_name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _tile_stem(records) -> dict[int, str]:
    """A relative output stem per source image: its file name without suffix, plus its image
    id when two images would share it (``a.jpg`` and ``a.png``)."""
    stems = {r.image_id: str(Path(r.file_name).with_suffix("")) for r in records}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {i: (s if counts[s] == 1 else f"{s}-{i}") for i, s in stems.items()}


def _source_boxes(data: dict, records: dict) -> dict[int, list[dict]]:
    """Per source image id: its annotations with the box clipped to the image (COCO absolute
    xywh), non-positive or fully outside boxes dropped."""
    out: dict[int, list[dict]] = {i: [] for i in records}
    for ann in data["annotations"]:
        record = records[int(ann["image_id"])]
        kept = clip_box_to_window(ann["bbox"], (0, 0, record.width, record.height))
        if kept is None:
            continue
        out[record.image_id].append(
            {
                "category_id": int(ann["category_id"]),
                "bbox": kept[0],
                "iscrowd": int(bool(ann.get("iscrowd", 0))),
            }
        )
    return out


def _candidate_tiles(records: dict, boxes: dict, tiles: TileConfig) -> list[_Tile]:
    assert tiles.size is not None
    out = []
    for record in records.values():
        for window in tile_windows(record.width, record.height, tiles.size, tiles.overlap):
            kept = []
            for ann in boxes[record.image_id]:
                clipped = clip_box_to_window(ann["bbox"], window)
                if clipped is None:
                    continue
                if not ann["iscrowd"] and clipped[1] < tiles.min_visibility:
                    continue
                kept.append({**ann, "bbox": clipped[0]})
            out.append(_Tile(record.image_id, record.file_name, window, kept))
    return out


def _select(candidates: list[_Tile], tiles: TileConfig, all_tiles: bool) -> list[_Tile]:
    """The tiles with boxes and ``round(empty_ratio * #with boxes)`` empty ones (by seed)."""
    if all_tiles:
        return candidates
    empty = [i for i, t in enumerate(candidates) if not t.has_boxes]
    n_full = len(candidates) - len(empty)
    n_empty = min(len(empty), round(tiles.empty_ratio * n_full))
    chosen = set(random.Random(tiles.seed).sample(empty, n_empty))
    return [t for i, t in enumerate(candidates) if t.has_boxes or i in chosen]


def _write_json_atomic(data: dict, file: Path) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, file)


def _write_tiles(selected: list[_Tile], records: dict, stems: dict, images_out: Path) -> None:
    """Crop and write the PNG of every selected tile, reading each source image once."""
    by_source: dict[int, list[_Tile]] = {}
    for t in selected:
        x0, y0 = t.window[:2]
        t.file_name = f"{stems[t.source_id]}_x{x0}_y{y0}.png"
        by_source.setdefault(t.source_id, []).append(t)
    for source_id, group in by_source.items():
        image = read_image(records[source_id].path)
        for t in group:
            target = images_out / t.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            image.crop(t.window).save(tmp, format="PNG")
            os.replace(tmp, target)


def _tiled_json(selected: list[_Tile], categories: list, source: Path, settings: dict) -> dict:
    """The COCO JSON of the selected tiles (see :func:`tile_coco`)."""
    images, anns = [], []
    for image_id, t in enumerate(selected, start=1):
        x0, y0, x1, y1 = t.window
        images.append(
            {
                "id": image_id,
                "file_name": t.file_name,
                "width": x1 - x0,
                "height": y1 - y0,
                "tile": {
                    "source": t.source_name,
                    "source_id": t.source_id,
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                },
            }
        )
        for ann in t.annotations:
            w, h = ann["bbox"][2:]
            anns.append({"id": len(anns) + 1, "image_id": image_id, **ann, "area": w * h})
    tiled = {
        "info": {"description": f"tiles of {source} by detrkit", "tiles": settings},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    return tiled


def tile_coco(
    images_dir: str | Path,
    annotations_file: str | Path,
    tiles: TileConfig,
    out_dir: str | Path | None = None,
    *,
    all_tiles: bool = False,
    source: str | None = None,
) -> tuple[Path, Path]:
    """Tile a COCO split; returns ``(tile image folder, tiled COCO JSON)``.

    images_dir / annotations_file: the source split (COCO absolute xywh boxes), validated by
    :func:`~detrkit.data.coco_index.load_coco_index` (its errors and repair warnings apply).
    tiles: the settings (``tiles.size`` must be set). out_dir: the cache root (default: the
    system temp folder's ``detrkit-tiles``); the split is written to ``<out_dir>/<digest>/``
    and reused when already complete there. all_tiles: keep every tile, empty ones included
    (for validation splits; ``empty_ratio`` and ``seed`` are then not used). source: the file
    that messages about the split name (when ``annotations_file`` is a conversion).

    Tiled JSON: ``images`` with ``id`` 1.., ``file_name`` (relative to the returned folder),
    ``width``, ``height`` and ``tile`` (origin, see the module docstring); ``annotations``
    with ``bbox`` (absolute xywh in the tile), ``area`` (of the clipped box), ``iscrowd``
    and ``category_id`` as in the source; the source's ``categories`` unchanged.
    """
    check_tile_config(tiles)
    if tiles.size is None:
        raise ConfigError("data.tiles.size: must be set to tile a dataset")
    images_dir, annotations_file = Path(images_dir), Path(annotations_file)
    index = load_coco_index(images_dir, annotations_file, check_image_sizes=True, source=source)
    records = {r.image_id: r for r in index.records}
    settings = {
        "size": tiles.size,
        "overlap": float(tiles.overlap),
        "min_visibility": float(tiles.min_visibility),
        "empty_ratio": None if all_tiles else float(tiles.empty_ratio),
        "seed": None if all_tiles else tiles.seed,
    }
    root = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / "detrkit-tiles"
    folder = root / _digest(annotations_file, images_dir, index.records, settings)
    images_out, json_out = folder / "images", folder / "annotations.json"
    if json_out.is_file():
        return images_out, json_out

    data = json.loads(annotations_file.read_text(encoding="utf-8"))
    boxes = _source_boxes(data, records)
    selected = _select(_candidate_tiles(records, boxes, tiles), tiles, all_tiles)
    images_out.mkdir(parents=True, exist_ok=True)
    _write_tiles(selected, records, _tile_stem(index.records), images_out)

    tiled = _tiled_json(selected, data["categories"], annotations_file, settings)
    _write_json_atomic(tiled, json_out)
    return images_out, json_out
