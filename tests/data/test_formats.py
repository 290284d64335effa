import json
from pathlib import Path

import numpy as np
import pytest

from detrkit.cli import main
from detrkit.config import Config, ConfigError, DataConfig
from detrkit.data import DatasetError, DatasetWarning
from detrkit.data.build import build_datasets
from detrkit.data.convert import convert_dataset
from detrkit.data.formats import dataset_classes
from tests.conftest import base_coco
from tests.data.test_yolo import png, small, yolo_dataset

XML = """<annotation><filename>{stem}.jpg</filename>
  <size><width>40</width><height>20</height></size>
  <object><name>{name}</name><bndbox>
    <xmin>{xmin}</xmin><ymin>2</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>
</annotation>
"""


def coco_folder(root: Path, val: dict | None = None) -> Path:
    """annotations/instances_{train,val}2017.json with images in train2017/ and val2017/."""
    for split, data in (("train", base_coco()), ("val", val or base_coco())):
        for entry in data["images"]:
            png(root / f"{split}2017" / entry["file_name"], entry["width"], entry["height"])
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def voc_folder(root: Path, xmin: int = 1) -> Path:
    """VOC layout: Annotations/, JPEGImages/ (PNG files while the XML names .jpg), ImageSets."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, name in (("a", "Alive"), ("b", "Dead"), ("c", "Alive")):
        png(root / "JPEGImages" / f"{stem}.png")
        text = XML.format(stem=stem, name=name, xmin=xmin if stem == "b" else 1)
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    return root


def test_coco_folder_discovery_sparse_ids_and_val_remapped_by_name(tmp_path, capsys):
    val = base_coco()
    for c in val["categories"]:  # same names, other ids
        c["id"] += 100
    for a in val["annotations"]:
        a["category_id"] += 100
    root = coco_folder(tmp_path, val)
    data = small(DataConfig(format="auto", dataset=str(root)))
    with pytest.warns(DatasetWarning, match="matched by name"):
        train, val_ds = build_datasets(data)
    assert "found COCO JSON" in capsys.readouterr().out
    assert train.label_map.category_ids == [2, 7, 11] and val_ds.label_map == train.label_map
    assert train.images_dir == root / "train2017" and val_ds.annotations_file != root
    cats = json.loads(val_ds.annotations_file.read_text())["categories"]
    assert sorted(c["id"] for c in cats) == [2, 7, 11]  # the evaluator reads these
    assert val_ds.index.records[0].labels.tolist() == train.index.records[0].labels.tolist()
    train[0]
    assert dataset_classes(data) == train.label_map


def test_coco_rename_merges_and_unknown_val_name(tmp_path):
    val = base_coco()
    val["categories"][0]["name"] = "wolf"
    root = coco_folder(tmp_path, val)
    data = small(DataConfig(format="coco", dataset=str(root), rename={"dog": "cat"}))
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: classes \['wolf'\]"):
        build_datasets(data)
    data.rename["wolf"] = "cat"
    train, _ = build_datasets(data)
    assert train.label_map.names == ["cat", "bird"] and train.label_map.category_ids == [2, 11]
    assert sorted(train.index.records[1].labels.tolist()) == [0]  # the dog box is a cat


def test_duplicate_annotation_ids(tmp_path):
    val = base_coco()
    val["annotations"][1]["id"] = 1
    root = coco_folder(tmp_path, val)
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: annotation id 1 appears"):
        build_datasets(small(DataConfig(format="coco", dataset=str(root))))


def test_voc_imagesets_rename_and_extension_fallback(tmp_path):
    root = voc_folder(tmp_path / "voc")
    data = small(DataConfig(format="auto", dataset=str(root), rename={"Dead": "Tree"}))
    with pytest.warns(DatasetWarning, match="name an image that is not in") as caught:
        train, val = build_datasets(data)
    fallback = [w for w in caught if "same stem" in str(w.message)]
    assert len(fallback) == 2  # once per split, not once per image
    assert "a.xml: a.jpg -> a.png" in str(fallback[0].message)
    assert train.label_map.names == ["Alive", "Tree"] and len(train) == 2 and len(val) == 1
    assert val.label_map == train.label_map and dataset_classes(data) == train.label_map
    np.testing.assert_allclose(train.index.records[0].boxes_xyxy, [[0, 1, 20, 10]])
    train[1]
    # explicit fields: an XML folder, one XML beside the images
    explicit = small(
        DataConfig(
            format="voc",
            train_images=str(root / "JPEGImages"),
            train_annotations=str(root / "Annotations"),
            val_images=str(root / "JPEGImages"),
            val_annotations=str(root / "Annotations" / "c.xml"),
        )
    )
    train, val = build_datasets(explicit)
    assert (len(train), len(val)) == (3, 1)


def test_voc_bad_xml(tmp_path):
    root = voc_folder(tmp_path / "voc", xmin=30)
    data = small(DataConfig(format="voc", dataset=str(root)))
    with pytest.raises(DatasetError, match=r"b\.xml: object 1 has xmax=20 < xmin=30"):
        build_datasets(data)
    (root / "Annotations" / "b.xml").write_text("<annotation>\n<filename>")
    with pytest.raises(DatasetError, match=r"b\.xml: malformed XML at line 2"):
        build_datasets(data)


def test_missing_split_and_config_errors(tmp_path):
    root = voc_folder(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"voc: no VOC val split \(looked for ImageSets"):
        build_datasets(DataConfig(format="voc", dataset=str(root)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot detect the dataset format"):
        build_datasets(DataConfig(format="auto", dataset=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="data.format=auto"):
        build_datasets(DataConfig(dataset=str(root)))
    cfg = Config()
    cfg.data.dataset = str(root)
    with pytest.raises(ConfigError, match="data.format=auto"):
        cfg.validate()
    cfg.data.format, cfg.data.dataset = "yolo", None
    with pytest.raises(ConfigError, match="data.train_images"):
        cfg.validate()


def test_cli_check_data_and_convert_round_trip(tmp_path, capsys):
    yolo_dataset(tmp_path / "yolo")
    assert main(["check-data", "--dataset", str(tmp_path / "yolo")]) == 0
    out = capsys.readouterr().out
    assert "== train (yolo)" in out and "== val (yolo)" in out
    assert main(["check-data", "--dataset", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: dataset not found" in capsys.readouterr().err
    coco = tmp_path / "coco"
    assert main(["convert-data", str(tmp_path / "yolo"), "--to", "coco", "--out", str(coco)]) == 0
    assert "images symlinked" in capsys.readouterr().out
    assert (coco / "train" / "a.png").is_symlink()
    back = tmp_path / "back"
    print(convert_dataset(coco, "yolo", back, copy=True))
    assert "images copied" in capsys.readouterr().out
    original = (tmp_path / "yolo" / "labels" / "train" / "a.txt").read_text().split()
    again = (back / "labels" / "train" / "a.txt").read_text().split()
    np.testing.assert_allclose([float(v) for v in again], [float(v) for v in original], atol=1e-6)
    assert (back / "labels" / "train" / "b.txt").read_text() == ""
    a = small(DataConfig(format="auto", dataset=str(tmp_path / "yolo")))
    b = small(DataConfig(format="auto", dataset=str(back)))
    ta, tb = build_datasets(a)[0], build_datasets(b)[0]
    assert ta.label_map == tb.label_map
    for ra, rb in zip(ta.index.records, tb.index.records):
        np.testing.assert_allclose(ra.boxes_xyxy, rb.boxes_xyxy, atol=1e-4)
        assert ra.labels.tolist() == rb.labels.tolist()


def test_check_data_reports_id_zero_and_explicit_voc(tmp_path, capsys):
    val = base_coco()
    root = coco_folder(tmp_path / "coco", val)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    data["categories"][1]["id"] = 0  # cat: 2 -> 0
    for a in data["annotations"]:
        a["category_id"] = 0 if a["category_id"] == 2 else a["category_id"]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    assert main(["check-data", "--dataset", str(root), "--format", "coco"]) == 0
    out = capsys.readouterr().out
    assert "id 0 is a class, not background, sparse ids 0..11" in out
    assert "matched by name" in out  # val's cat is id 2
    voc = voc_folder(tmp_path / "voc")
    argv = ["check-data", "--format", "voc", "--images", str(voc / "JPEGImages")]
    assert main([*argv, "--annotations", str(voc / "Annotations")]) == 0
    out = capsys.readouterr().out
    assert "== val (voc)" in out and "used the image with the same stem" in out
