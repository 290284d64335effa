import json

import numpy as np
import torch
from PIL import Image

from detrkit.config import SyntheticConfig
from detrkit.data.coco import CocoDetection
from detrkit.data.synthetic import SHAPE_CATEGORY_IDS, SHAPE_NAMES, generate_shapes
from detrkit.presets import get_preset

CFG = SyntheticConfig(num_train=12, num_val=4, image_size=64, min_objects=1, max_objects=3, seed=3)


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_shapes(tmp_path / "a", CFG)
    generate_shapes(tmp_path / "b", CFG)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 12 + 4 + 3 and a == b
    other = SyntheticConfig(**{**CFG.__dict__, "seed": 4})
    generate_shapes(tmp_path / "c", other)
    assert _files(tmp_path / "c")["train/00000.png"] != a["train/00000.png"]


def test_valid_coco_with_non_contiguous_ids(tmp_path):
    paths = generate_shapes(tmp_path, CFG)
    data = json.loads(paths.train_annotations.read_text())
    assert [c["id"] for c in data["categories"]] == list(SHAPE_CATEGORY_IDS) == [1, 3, 5, 7]
    assert [c["name"] for c in data["categories"]] == list(SHAPE_NAMES)
    assert len(SHAPE_NAMES) == get_preset("test_detr_tiny").model.num_classes
    assert len(data["images"]) == 12
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 3
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert 0.1 * 64 <= max(w, h) <= 0.5 * 64 and 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
    ds = CocoDetection(paths.train_images, paths.train_annotations, train=True)
    assert ds.label_map.category_ids == [1, 3, 5, 7]
    assert sum(len(ds[i][1]) for i in range(len(ds))) == len(data["annotations"])


def test_box_encloses_the_drawn_shape(tmp_path):
    """Each box is the tight extent of its shape: the shape's colour differs from the
    background just outside an isolated box."""
    paths = generate_shapes(
        tmp_path,
        SyntheticConfig(
            num_train=6, num_val=1, image_size=64, min_objects=1, max_objects=1, seed=0
        ),
    )
    data = json.loads(paths.train_annotations.read_text())
    for ann in data["annotations"]:
        image = np.asarray(
            Image.open(paths.train_images / f"{ann['image_id'] - 1:05d}.png"), np.float32
        )
        x, y, w, h = ann["bbox"]
        inside = image[y : y + h, x : x + w]
        # the box edges touch the shape: each border row/column of the box holds shape pixels,
        # i.e. pixels far from the median colour of the image (the background)
        background = np.median(image.reshape(-1, 3), axis=0)
        far = np.linalg.norm(inside - background, axis=-1) > 60
        assert far[0].any() and far[-1].any() and far[:, 0].any() and far[:, -1].any()


def test_idempotent_and_regenerates_on_config_change(tmp_path):
    paths = generate_shapes(tmp_path, CFG)
    stamp = paths.train_annotations.stat().st_mtime_ns
    first = paths.train_images / "00000.png"
    first.write_bytes(b"marker")  # not rewritten when the config is unchanged
    generate_shapes(tmp_path, CFG)
    assert first.read_bytes() == b"marker"
    assert paths.train_annotations.stat().st_mtime_ns == stamp
    bigger = SyntheticConfig(**{**CFG.__dict__, "num_train": 13})
    generate_shapes(tmp_path, bigger)
    assert first.read_bytes() != b"marker"
    assert len(json.loads(paths.train_annotations.read_text())["images"]) == 13
    assert json.loads((tmp_path / "meta.json").read_text())["config"]["num_train"] == 13
    (paths.val_images / "00002.png").unlink()  # an incomplete dataset is written again
    generate_shapes(tmp_path, bigger)
    assert (paths.val_images / "00002.png").is_file()


def test_default_size_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    generate_shapes(tmp_path, SyntheticConfig(num_train=128, num_val=16))
    assert time.perf_counter() - start < 10.0
    image, target = CocoDetection(
        tmp_path / "val", tmp_path / "annotations/instances_val.json", train=False
    )[0]
    assert image.shape == (3, 128, 128) and torch.all(target.boxes <= 1)
