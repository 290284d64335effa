import pytest
import torch

from detrkit.config import ConfigError, DataConfig, SyntheticConfig
from detrkit.data import DatasetError
from detrkit.data.build import build_datasets, build_loader
from detrkit.data.check import check_dataset
from detrkit.presets import get_preset
from tests.conftest import base_coco, write_coco


def _tiny_data(root) -> DataConfig:
    data = get_preset("test_detr_tiny").data
    data.root = str(root)
    data.synthetic = SyntheticConfig(num_train=10, num_val=3, image_size=64, max_objects=3)
    data.augment.train_scales, data.augment.max_size, data.augment.val_scale = [48, 64], 96, 64
    return data


def test_build_synthetic_datasets_and_loaders(tmp_path):
    train, val = build_datasets(_tiny_data(tmp_path))
    assert (len(train), len(val)) == (10, 3) and train.train and not val.train
    assert val.label_map == train.label_map and train.label_map.category_ids == [1, 3, 5, 7]
    assert val.annotations_file == tmp_path / "annotations" / "instances_val.json"
    image, target = val[0]
    assert image.shape == (3, 64, 64) and target.size == (64, 64)
    assert abs(float(image.mean())) < 3.0  # normalised, not 0..1 or 0..255

    def order(seed):
        return [t.image_id for _, ts in build_loader(train, 4, True, 0, seed) for t in ts]

    assert order(5) == order(5) and sorted(order(5)) == train.image_ids
    assert order(5) != order(6)
    batches = list(build_loader(val, 2, False, 0, 0))
    assert [len(ts) for _, ts in batches] == [2, 1]  # drop_last is False
    assert [t.image_id for _, ts in batches for t in ts] == val.image_ids  # not shuffled
    batch, _ = batches[0]
    assert batch.images.shape[0] == 2 and batch.orig_sizes.tolist() == [[64, 64], [64, 64]]


def test_training_samples_do_not_depend_on_workers_or_on_skipped_batches(tmp_path):
    train, _ = build_datasets(_tiny_data(tmp_path))

    def batches(workers, skip=0):
        loader = build_loader(train, 2, True, workers, seed=3, skip_batches=skip)
        return [(b.images, [t.boxes for t in ts]) for b, ts in loader]

    alone, with_worker, resumed = batches(0), batches(1), batches(0, skip=2)
    assert len(alone) == 5 and len(resumed) == 3
    for (a_img, a_boxes), (b_img, b_boxes) in zip(alone, with_worker, strict=True):
        assert torch.equal(a_img, b_img) and all(map(torch.equal, a_boxes, b_boxes))
    for (a_img, _), (b_img, _) in zip(alone[2:], resumed, strict=True):
        assert torch.equal(a_img, b_img)  # the same augmentation, not the next draws
    before = torch.get_rng_state()
    batches(0)
    assert torch.equal(before, torch.get_rng_state())  # the caller's generator is untouched
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(alone, batches(0)[::-1]))


def test_build_coco_requires_paths(tmp_path):
    data = DataConfig(format="coco")
    with pytest.raises(ConfigError, match="data.train_images"):
        build_datasets(data)
    images, ann = write_coco(tmp_path, base_coco())
    data = DataConfig(
        format="coco",
        train_images=str(images),
        train_annotations=str(ann),
        val_images=str(images),
        val_annotations=str(ann),
    )
    train, val = build_datasets(data)
    assert train.label_map.category_ids == [2, 7, 11] and len(val) == 2


def test_check_dataset_report(tmp_path):
    data = base_coco()
    data["images"].append({"id": 30, "file_name": "c.png", "width": 40, "height": 30})
    data["annotations"].append(
        {"id": 4, "image_id": 10, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1}
    )
    data["annotations"].append(
        {"id": 5, "image_id": 20, "category_id": 7, "bbox": [35, 1, 10, 5], "iscrowd": 0}
    )
    images, ann = write_coco(tmp_path, data)
    report = check_dataset(images, ann)
    assert "images:      3 (1 without boxes)" in report
    assert "annotations: 5 (4 boxes used for training, 1 crowd, 0 dropped)" in report
    rows = {
        line.split()[2]: line.split()[3:]
        for line in report.splitlines()
        if line.strip().split()[:1] and line.strip().split()[0].isdigit()
    }
    assert rows == {"cat": ["1", "1"], "dog": ["2", "1"], "bird": ["1", "1"]}
    assert "clipped 1 boxes extending outside" in report and str(ann) in report
    broken = base_coco()
    del broken["categories"]
    images, ann = write_coco(tmp_path / "bad", broken)
    with pytest.raises(DatasetError, match="missing required key 'categories'"):
        check_dataset(images, ann)
