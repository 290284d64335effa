"""The synthetic shapes dataset: COCO JSON + PNG images generated from a seed.

Four shape classes, told apart by their outline: circle, square, triangle and cross, with the
deliberately non-contiguous category ids 1, 3, 5 and 7 (so that the label map is exercised).
Each square image of side ``image_size`` holds ``min_objects..max_objects`` shapes of side
about 12%-45% of the image (aspect ratio 0.8-1.25), in colours that contrast with a textured
background (gradients, stripes, smooth noise, pixel noise). Shapes may overlap a little (at
most 30% of the smaller box). Boxes are the tight pixel extent of each drawn shape.

Layout under ``root``::

    train/00000.png ...            val/00000.png ...
    annotations/instances_train.json   annotations/instances_val.json
    meta.json                      the SyntheticConfig used (written last)

Generation is deterministic (numpy ``Generator`` seeded by ``seed`` and the split) and
idempotent: when ``meta.json`` records the same config and the files exist, nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detrkit.config import SyntheticConfig

__all__ = ["SHAPE_NAMES", "SHAPE_CATEGORY_IDS", "SyntheticPaths", "generate_shapes"]

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
SHAPE_CATEGORY_IDS = (1, 3, 5, 7)
_FORMAT_VERSION = 1
_MAX_OVERLAP = 0.3  # intersection / area of the smaller box
_MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and the background under it


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`generate_shapes` wrote the two splits."""

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


def _paths(root: Path) -> SyntheticPaths:
    return SyntheticPaths(
        root / "train",
        root / "annotations" / "instances_train.json",
        root / "val",
        root / "annotations" / "instances_val.json",
    )


def _meta(cfg: SyntheticConfig) -> dict:
    return {"format_version": _FORMAT_VERSION, "config": dataclasses.asdict(cfg)}


def _is_complete(root: Path, cfg: SyntheticConfig, paths: SyntheticPaths) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta != _meta(cfg):
        return False
    expected = [(paths.train_images, cfg.num_train), (paths.val_images, cfg.num_val)]
    return (
        paths.train_annotations.is_file()
        and paths.val_annotations.is_file()
        and all((folder / f"{i:05d}.png").is_file() for folder, n in expected for i in range(n))
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so concurrent writers (DDP ranks) never leave a
    half-written file (they all write the same bytes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- backgrounds


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured ``[size, size, 3]`` float32 background in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] each, in [0, 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)
    proj = np.cos(angle) * xx + np.sin(angle) * yy  # [S, S]
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == 1:  # soft stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * proj + rng.uniform(0, 2 * np.pi))
    else:  # smooth noise: a coarse random grid upsampled bilinearly
        cells = int(rng.integers(3, 9))
        coarse = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
        t = (
            np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
            / 255.0
        )
    image = c0 + (c1 - c0) * t[..., None]  # [S, S, 3]
    image += rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    return image.astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least ``_MIN_CONTRAST`` away from the mean colour ``under`` [3]."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            break
    else:
        colour = np.where(under > 127, rng.uniform(0, 40, 3), rng.uniform(215, 255, 3))
    return int(colour[0]), int(colour[1]), int(colour[2])


# ----------------------------------------------------------------------------- shapes


def _shape_mask(
    kind: int, x0: int, y0: int, w: int, h: int, size: int, rng: np.random.Generator
) -> Image.Image:
    """An ``L`` mask (255 inside) of shape ``kind`` filling the box ``(x0, y0, w, h)``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + w - 1, y0 + h - 1  # inclusive last pixel
    if kind == 0:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif kind == 1:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif kind == 2:
        corners = [(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)]  # apex up
        direction = int(rng.integers(4))  # rotate by multiples of 90 degrees about the box
        if direction == 1:
            corners = [(x0, y0), (x1, y0), ((x0 + x1) / 2, y1)]
        elif direction == 2:
            corners = [(x0, y0), (x0, y1), (x1, (y0 + y1) / 2)]
        elif direction == 3:
            corners = [(x1, y0), (x1, y1), (x0, (y0 + y1) / 2)]
        draw.polygon(corners, fill=255)
    else:
        tw = max(2, round(w * rng.uniform(0.28, 0.4)))  # bar thickness
        th = max(2, round(h * rng.uniform(0.28, 0.4)))
        cx, cy = x0 + (w - tw) // 2, y0 + (h - th) // 2
        draw.rectangle([cx, y0, cx + tw - 1, y1], fill=255)
        draw.rectangle([x0, cy, x1, cy + th - 1], fill=255)
    return mask


def _overlap_ok(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x0 + w, px + pw) - max(x0, px)
        ih = min(y0 + h, py + ph) - max(y0, py)
        if iw > 0 and ih > 0 and iw * ih > _MAX_OVERLAP * min(w * h, pw * ph):
            return False
    return True


def _make_image(
    rng: np.random.Generator, cfg: SyntheticConfig
) -> tuple[Image.Image, list[tuple[int, list[int], int]]]:
    """One image and its objects as ``(class index, [x, y, w, h], area)``."""
    size = cfg.image_size
    background = _background(rng, size)  # [S, S, 3]
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[tuple[int, int, int, int]] = []
    objects: list[tuple[int, list[int], int]] = []
    for _ in range(count):
        kind = int(rng.integers(len(SHAPE_NAMES)))
        scale = 1.0
        for attempt in range(60):
            if attempt and attempt % 15 == 0:
                scale *= 0.8  # crowded: try smaller shapes
            side = rng.uniform(0.12, 0.45) * size * scale
            aspect = np.sqrt(rng.uniform(0.8, 1.25))
            w = int(np.clip(round(side * aspect), 4, size))
            h = int(np.clip(round(side / aspect), 4, size))
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if _overlap_ok((x0, y0, w, h), placed):
                break
        else:
            continue
        mask = _shape_mask(kind, x0, y0, w, h, size, rng)
        left, top, right, bottom = mask.getbbox() or (x0, y0, x0 + w, y0 + h)
        under = background[top:bottom, left:right].reshape(-1, 3).mean(axis=0)
        canvas.paste(_contrasting_colour(rng, under), mask=mask)
        placed.append((left, top, right - left, bottom - top))
        area = int(np.count_nonzero(np.asarray(mask)))
        objects.append((kind, [left, top, right - left, bottom - top], area))
    return canvas, objects


def _write_split(
    images_dir: Path, annotations: Path, num: int, cfg: SyntheticConfig, split: int
) -> None:
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, split])
    images, anns = [], []
    for i in range(num):
        canvas, objects = _make_image(rng, cfg)
        name = f"{i:05d}.png"
        path = images_dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        canvas.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
        images.append(
            {"id": i + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size}
        )
        for kind, bbox, area in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": SHAPE_CATEGORY_IDS[kind],
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": "detrkit synthetic shapes", "version": str(_FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"}
            for cid, name in zip(SHAPE_CATEGORY_IDS, SHAPE_NAMES)
        ],
    }
    annotations.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(annotations, json.dumps(data, indent=1).encode())


def generate_shapes(root: str | Path, cfg: SyntheticConfig) -> SyntheticPaths:
    """Write (or find already written) the synthetic shapes train and val splits under
    ``root`` (see the module docstring) and return their paths."""
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError(
            "generate_shapes: need 1 <= min_objects <= max_objects, got "
            f"{cfg.min_objects}, {cfg.max_objects}"
        )
    if cfg.image_size < 16:
        raise ValueError(f"generate_shapes: image_size must be >= 16, got {cfg.image_size}")
    root = Path(root)
    paths = _paths(root)
    if _is_complete(root, cfg, paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    _write_split(paths.train_images, paths.train_annotations, cfg.num_train, cfg, split=0)
    _write_split(paths.val_images, paths.val_annotations, cfg.num_val, cfg, split=1)
    _write_atomic(root / "meta.json", json.dumps(_meta(cfg), indent=1).encode())
    return paths
