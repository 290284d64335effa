"""Tiling COCO splits: windows, box clipping and visibility, empty-tile sampling, the cache,
and the tiled split loading as a CocoDetection."""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from detrkit.config import ConfigError, TileConfig
from detrkit.data.coco import CocoDetection
from detrkit.data.tiles import check_tile_config, clip_box_to_window, tile_coco, tile_windows


def _starts_ok(starts: list[int], length: int, size: int, overlap: float) -> None:
    if length <= size:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == length - size
    for a, b in itertools.pairwise(starts):
        assert b > a
        assert (a + size) - b >= overlap * size - 1  # shared pixels, up to rounding


@pytest.mark.parametrize(
    "width, height, size, overlap",
    [(500, 300, 128, 0.2), (256, 256, 128, 0.0), (100, 60, 128, 0.5), (1000, 129, 64, 0.25),
     (384, 200, 128, 0.0), (130, 128, 128, 0.9)],
)  # fmt: skip
def test_windows_cover_the_image_with_the_overlap(width, height, size, overlap):
    windows = tile_windows(width, height, size, overlap)
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(size, width) and y1 - y0 == min(size, height)
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    _starts_ok(sorted({w[0] for w in windows}), width, size, overlap)
    _starts_ok(sorted({w[1] for w in windows}), height, size, overlap)
    assert len(set(windows)) == len(windows)


def test_windows_hand_examples():
    # exact multiple, no overlap: a 2 x 2 grid; rows first
    assert tile_windows(256, 256, 128, 0.0) == [
        (0, 0, 128, 128), (128, 0, 256, 128), (0, 128, 128, 256), (128, 128, 256, 256),
    ]  # fmt: skip
    # stride 80 (0.2 overlap of 100): starts 0 and 80, then the last flush at 250 - 100
    assert [w[0] for w in tile_windows(250, 50, 100, 0.2)] == [0, 80, 150]
    assert tile_windows(50, 40, 100, 0.2) == [(0, 0, 50, 40)]  # smaller than a tile: one


@pytest.mark.parametrize(
    "field, value, needle",
    [("size", 0, "data.tiles.size: must be a positive integer"),
     ("overlap", 1.0, "data.tiles.overlap: must be in [0, 1)"),
     ("overlap", -0.1, "data.tiles.overlap"),
     ("min_visibility", 1.5, "data.tiles.min_visibility: must be in [0, 1]"),
     ("empty_ratio", -1, "data.tiles.empty_ratio: must be a number >= 0"),
     ("seed", 1.5, "data.tiles.seed")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors_naming_the_field(field, value, needle):
    with pytest.raises(ConfigError) as info:
        check_tile_config(replace(TileConfig(size=64), **{field: value}))
    assert needle in str(info.value) and "\n" not in str(info.value)
    check_tile_config(TileConfig())  # the defaults (tiling off) are valid


def test_clip_box_to_window_by_hand():
    # box x 90..130, y 10..30 (area 800); window x 0..100: 10 of 40 px wide inside
    clipped, visible = clip_box_to_window([90, 10, 40, 20], (0, 0, 100, 100))
    assert clipped == [90, 10, 10, 20] and visible == pytest.approx(0.25)
    # the next window starting at x=80: x 90..130 -> 10..50 in the tile, all inside
    clipped, visible = clip_box_to_window([90, 10, 40, 20], (80, 0, 180, 100))
    assert clipped == [10, 10, 40, 20] and visible == 1.0
    assert clip_box_to_window([90, 10, 40, 20], (200, 0, 300, 100)) is None


def _split(tmp_path, sizes, boxes, name="src"):
    """A COCO split of images ``sizes`` [(w, h)] with ``boxes`` {image index: [(cat, xywh,
    iscrowd)]} under ``tmp_path/name``."""
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
        for cat, bbox, crowd in boxes.get(i, []):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                         "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd})  # fmt: skip
    ann_file = tmp_path / f"{name}.json"
    cats = [{"id": 1, "name": "tree"}, {"id": 2, "name": "car"}]
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return folder, ann_file


def _by_origin(data: dict) -> dict[tuple[int, int], list[dict]]:
    out: dict[tuple[int, int], list[dict]] = {}
    for im in data["images"]:
        key = (im["tile"]["x0"], im["tile"]["y0"])
        out[key] = [a for a in data["annotations"] if a["image_id"] == im["id"]]
    return out


@pytest.mark.parametrize("min_visibility", [0.2, 0.25, 0.3])
def test_a_cut_box_is_kept_iff_visible_enough(tmp_path, min_visibility):
    # 180 x 100 image, tiles of 100 with overlap 0.2: windows x 0..100 and 80..180
    # box x 90..130 (w 40): 25 % inside the first tile, whole in the second
    images, ann = _split(tmp_path, [(180, 100)], {0: [(2, [90, 10, 40, 20], 0)]})
    tiles = TileConfig(size=100, overlap=0.2, min_visibility=min_visibility, empty_ratio=1.0)
    out_images, out_json = tile_coco(images, ann, tiles, tmp_path / "cache")
    data = json.loads(out_json.read_text())
    by_origin = _by_origin(data)
    assert set(by_origin) == {(0, 0), (80, 0)}
    first = by_origin[(0, 0)]
    if min_visibility <= 0.25:
        assert [a["bbox"] for a in first] == [[90, 10, 10, 20]] and first[0]["area"] == 200
    else:
        assert first == []
    (second,) = by_origin[(80, 0)]
    assert second["bbox"] == [10, 10, 40, 20] and second["category_id"] == 2
    im = next(i for i in data["images"] if i["tile"]["x0"] == 80)
    assert im["tile"] == {"source": "im0.png", "source_id": 1, "x0": 80, "y0": 0, "x1": 180,
                          "y1": 100}  # fmt: skip
    # the tile's pixels are the source's crop
    source = np.asarray(Image.open(images / "im0.png"))
    tile = np.asarray(Image.open(out_images / im["file_name"]))
    assert (tile == source[0:100, 80:180]).all()


def test_crowd_is_kept_and_the_split_loads_as_coco_detection(tmp_path):
    boxes = {0: [(1, [10, 10, 30, 30], 0), (2, [150, 150, 80, 80], 1)], 1: []}
    images, ann = _split(tmp_path, [(300, 260), (60, 50)], boxes)
    tiles = TileConfig(size=128, overlap=0.25, min_visibility=0.5, empty_ratio=10.0)
    out_images, out_json = tile_coco(images, ann, tiles, tmp_path / "cache")
    data = json.loads(out_json.read_text())
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowd and all(a["category_id"] == 2 for a in crowd)
    small = [i for i in data["images"] if i["tile"]["source"] == "im1.png"]
    assert [(i["width"], i["height"]) for i in small] == [(60, 50)]  # one tile, not padded
    dataset = CocoDetection(out_images, out_json, train=True)
    assert len(dataset) == len(data["images"])
    assert dataset.label_map.names == ["tree", "car"]
    with_tree = next(
        k for k, r in enumerate(dataset.index.records) if r.file_name == "im0_x0_y0.png"
    )
    image, target = dataset[with_tree]
    assert tuple(image.shape) == (3, 128, 128) and target.labels.tolist() == [0]


def test_empty_tiles_are_sampled_by_ratio_and_seed(tmp_path):
    # 10 x 10 grid of 32 px tiles without overlap, one box in the first tile only
    images, ann = _split(tmp_path, [(320, 320)], {0: [(1, [2, 2, 10, 10], 0)]})
    base = TileConfig(size=32, overlap=0.0, min_visibility=0.5, empty_ratio=5.0, seed=3)

    def origins(tiles, name, **kw):
        _, out_json = tile_coco(images, ann, tiles, tmp_path / name, **kw)
        return [(i["tile"]["x0"], i["tile"]["y0"]) for i in json.loads(out_json.read_text())
                ["images"]]  # fmt: skip

    first = origins(base, "a")
    assert len(first) == 1 + 5 and (0, 0) in first
    assert origins(base, "b") == first  # same seed, same tiles
    other = origins(replace(base, seed=4), "c")
    assert len(other) == 6 and set(other) != set(first)
    empty = [t for t in first if t != (0, 0)]
    candidates = [(x, y) for y in range(0, 320, 32) for x in range(0, 320, 32)][1:]
    assert set(empty) == {candidates[i] for i in random.Random(3).sample(range(99), 5)}
    assert len(origins(replace(base, empty_ratio=0.0), "d")) == 1
    assert len(origins(replace(base, empty_ratio=1000.0), "e")) == 100
    assert len(origins(replace(base, empty_ratio=0.0), "f", all_tiles=True)) == 100


def test_the_cache_is_reused_and_keyed_by_the_settings(tmp_path):
    images, ann = _split(tmp_path, [(200, 150)], {0: [(1, [20, 20, 40, 40], 0)]})
    tiles = TileConfig(size=100, overlap=0.2, empty_ratio=1.0)
    cache = tmp_path / "cache"
    out_images, out_json = tile_coco(images, ann, tiles, cache)
    stamps = {p: p.stat().st_mtime_ns for p in [out_json, *out_images.iterdir()]}
    os.utime(out_json, ns=(1, 1))  # a rewrite would change this
    again = tile_coco(images, ann, tiles, cache)
    assert again == (out_images, out_json) and out_json.stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != out_json)
    _, other_json = tile_coco(images, ann, replace(tiles, overlap=0.5), cache)
    assert other_json != out_json and other_json.is_file()
    assert len(list(cache.iterdir())) == 2
    assert not list(cache.rglob("*.tmp"))


def test_tiling_needs_a_size(tmp_path):
    images, ann = _split(tmp_path, [(64, 64)], {})
    with pytest.raises(ConfigError, match="data.tiles.size"):
        tile_coco(images, ann, TileConfig(), tmp_path / "cache")


def test_build_datasets_tiles_train_and_optionally_val(tmp_path):
    """``data.tiles`` reaches the datasets: the training split is tiled, the validation split
    too (every tile) unless ``data.tiles.val`` is false, when it stays whole images."""
    from detrkit.config import DataConfig
    from detrkit.data.build import build_datasets
    from tests.conftest import write_coco

    data = {
        "images": [{"id": 1, "file_name": "big.png", "width": 300, "height": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "iscrowd": 0}
        ],
        "categories": [{"id": 3, "name": "tree"}],
    }
    images, ann = write_coco(tmp_path / "src", data)
    cfg = DataConfig(
        format="coco",
        train_images=str(images),
        train_annotations=str(ann),
        val_images=str(images),
        val_annotations=str(ann),
        tiles=TileConfig(size=128, overlap=0.0, empty_ratio=0.0),
    )
    train, val = build_datasets(cfg)
    assert len(train) == 1  # the one tile with the box (empty tiles: ratio 0)
    assert len(val) == len(tile_windows(300, 200, 128, 0.0))  # every tile
    assert train.label_map.names == val.label_map.names == ["tree"]
    _, whole = build_datasets(replace(cfg, tiles=replace(cfg.tiles, val=False)))
    assert len(whole) == 1 and whole.annotations_file == ann
