from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.config import DataConfig
from detrkit.data import DatasetError
from detrkit.data.build import build_datasets
from detrkit.data.check import check_splits
from detrkit.data.formats import dataset_classes
from detrkit.data.yolo import read_data_yaml


def png(path: Path, w: int = 40, h: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 80, np.uint8)).save(path)


def small(data: DataConfig) -> DataConfig:
    data.augment.train_scales, data.augment.max_size, data.augment.val_scale = [32], 64, 32
    return data


def yolo_dataset(root: Path, names="{0: car, 1: person, 2: bike}", labels=None) -> Path:
    """images/{train,val}: a.png (40x20, labelled), b.png (no label file), c.png (empty)."""
    for split in ("train", "val"):
        for stem in ("a", "b", "c"):
            png(root / "images" / split / f"{stem}.png")
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        text = labels if labels is not None else "1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n"
        (root / "labels" / split / "a.txt").write_text(text)
        (root / "labels" / split / "c.txt").write_text("")
    yaml_file = root / "data.yaml"
    yaml_file.write_text(f"train: images/train\nval: images/val\nnames: {names}\n")
    return yaml_file


def test_yolo_trains_loads_with_background_images(tmp_path):
    yaml_file = yolo_dataset(tmp_path)
    data = small(DataConfig(format="yolo", dataset=str(yaml_file)))
    train, val = build_datasets(data)
    assert train.label_map.names == ["car", "person", "bike"]
    assert train.label_map.category_ids == [1, 2, 3] and val.label_map == train.label_map
    assert len(train) == 3 and train.annotations_file.is_file()
    records = {r.file_name: r for r in train.index.records}
    # person: cx 0.5 cy 0.5 w 0.5 h 0.5 of 40x20 -> xyxy 10, 5, 30, 15
    np.testing.assert_allclose(records["a.png"].boxes_xyxy, [[10, 5, 30, 15], [8, 3, 12, 7]])
    assert records["a.png"].labels.tolist() == [1, 0]
    assert len(records["b.png"].labels) == 0 and len(records["c.png"].labels) == 0
    image, target = train[0]
    assert image.shape[0] == 3 and target.boxes.shape[1] == 4
    assert dataset_classes(data) == train.label_map


def test_yolo_yaml_list_names_path_and_txt_list(tmp_path):
    root = tmp_path / "ds"
    yolo_dataset(root)
    (root / "train.txt").write_text("./images/train/a.png\nimages/train/b.png\n")
    yaml_file = tmp_path / "cfg" / "data.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(
        "path: ../ds\ntrain: train.txt\nval: images/val\nnames: [car, person, bike]\n"
    )
    spec = read_data_yaml(yaml_file)
    assert spec.names == ["car", "person", "bike"] and spec.train.resolve() == root / "train.txt"
    train, val = build_datasets(small(DataConfig(format="yolo", dataset=str(yaml_file))))
    assert len(train) == 2 and len(val) == 3
    assert sorted(r.file_name for r in train.index.records) == [
        "images/train/a.png",
        "images/train/b.png",
    ]


def test_auto_detects_yolo_folder_and_rename_merges(tmp_path, capsys):
    yolo_dataset(tmp_path)
    data = small(DataConfig(format="auto", dataset=str(tmp_path), rename={"bike": "car"}))
    train, _ = build_datasets(data)
    assert "format=auto found YOLO data.yaml" in capsys.readouterr().out
    assert train.label_map.names == ["car", "person"]
    a = next(r for r in train.index.records if r.file_name == "a.png")
    assert a.labels.tolist() == [1, 0]
    report = check_splits(data)
    assert "== train (yolo)" in report and "== val (yolo)" in report
    assert "images:      3 (2 without boxes)" in report


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 0.5 0.5 0.5", r"a\.txt: line 2: 4 values; expected 5"),
        ("1 0.5 0.5 0.5 0.5 0.9", r"a\.txt: line 2: 6 values; expected 5"),
        ("1 0.5 1.5 0.5 0.5", r"a\.txt: line 2: cy=1\.5 is outside \[0, 1\]"),
        ("7 0.5 0.5 0.5 0.5", r"a\.txt: line 2: class index 7 is not one of the 3 classes"),
    ],
)
def test_yolo_bad_label_lines_name_file_and_line(tmp_path, line, message):
    yaml_file = yolo_dataset(tmp_path, labels=f"0 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(DatasetError, match=message):
        build_datasets(small(DataConfig(format="yolo", dataset=str(yaml_file))))


def test_yolo_yaml_without_names(tmp_path):
    yaml_file = yolo_dataset(tmp_path)
    yaml_file.write_text("train: images/train\nval: images/val\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: no 'names'"):
        build_datasets(small(DataConfig(format="auto", dataset=str(tmp_path))))
    yaml_file.write_text("train: images/train\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: no 'val' entry"):
        dataset_classes(DataConfig(format="yolo", dataset=str(yaml_file)))
