"""Small COCO datasets written to a temporary folder for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def base_coco() -> dict:
    """Two 40x30 (w x h) images, three categories with non-contiguous ids 2, 7, 11."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 20, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 11, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [20, 10, 12, 15], "iscrowd": 0},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"},
                       {"id": 11, "name": "bird"}],
    }


def write_coco(root: Path, data: dict | str, sizes: dict[str, tuple[int, int]] | None = None,
               skip: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write ``data`` (a dict, or raw text) as ``root/ann.json`` and one RGB PNG per image
    entry into ``root/images`` (``sizes``: file name -> (w, h) overriding the JSON's; ``skip``:
    file names not to write). Returns ``(images_dir, annotations_file)``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        for entry in data.get("images", []):
            name = entry["file_name"]
            if name in skip:
                continue
            w, h = (sizes or {}).get(name, (entry.get("width", 40), entry.get("height", 30)))
            pixels = np.full((h, w, 3), 90, np.uint8)
            Image.fromarray(pixels).save(images / name)
        text = json.dumps(data, indent=1)
    else:
        text = data
    ann = root / "ann.json"
    ann.write_text(text)
    return images, ann
