import copy
import warnings

import pytest
import torch

from detrkit.boxes import cxcywh_to_xyxy
from detrkit.data import DatasetError, DatasetWarning
from detrkit.data.coco import CocoDetection
from detrkit.structures import LabelMap
from tests.conftest import base_coco, write_coco


def _abs_xyxy(target):
    h, w = target.size
    return cxcywh_to_xyxy(target.boxes) * torch.tensor([w, h, w, h])


def test_label_map_sorted_by_non_contiguous_ids(tmp_path):
    images, ann = write_coco(tmp_path, base_coco())
    ds = CocoDetection(images, ann, train=True)
    assert ds.label_map.category_ids == [2, 7, 11]
    assert ds.label_map.names == ["cat", "dog", "bird"]
    assert ds.image_ids == [10, 20] and ds.annotations_file == ann
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    # annotation 1 is category 11 (bird -> 2), annotation 2 category 2 (cat -> 0)
    assert target.labels.tolist() == [2, 0] and target.labels.dtype == torch.int64
    assert target.image_id == 10 and target.size == (30, 40) and target.orig_size == (30, 40)
    torch.testing.assert_close(
        _abs_xyxy(target), torch.tensor([[2.0, 3, 12, 11], [20, 10, 32, 25]])
    )
    torch.testing.assert_close(target.boxes[0], torch.tensor([7 / 40, 7 / 30, 10 / 40, 8 / 30]))
    assert ds[1][1].labels.tolist() == [1]


def test_given_label_map_is_used(tmp_path):
    images, ann = write_coco(tmp_path, base_coco())
    lm = LabelMap([11, 7, 2, 99], ["bird", "dog", "cat", "other"])
    ds = CocoDetection(images, ann, train=False, label_map=lm)
    assert ds.label_map is lm and ds[0][1].labels.tolist() == [0, 2]
    with pytest.raises(DatasetError, match="not in the label map"):
        CocoDetection(images, ann, train=False, label_map=LabelMap([2, 7], ["cat", "dog"]))


def test_crowd_excluded_and_empty_image_allowed(tmp_path):
    data = base_coco()
    data["annotations"][1]["iscrowd"] = 1
    data["annotations"] = data["annotations"][:2]  # image 20 has no annotation
    images, ann = write_coco(tmp_path, data)
    ds = CocoDetection(images, ann, train=True)
    _, target = ds[0]
    assert target.labels.tolist() == [2] and target.boxes.shape == (1, 4)
    _, empty = ds[1]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert empty.boxes.dtype == torch.float32 and empty.labels.dtype == torch.int64
    assert ds.index.records[0].num_crowd == 1


def _broken(data, case):
    if case == "no_images":
        del data["images"]
    elif case == "no_categories":
        del data["categories"]
    elif case == "no_annotations":
        del data["annotations"]
    elif case == "unknown_image":
        data["annotations"][0]["image_id"] = 99
    elif case == "unknown_category":
        data["annotations"][2]["category_id"] = 3
    elif case == "bad_bbox":
        data["annotations"][0]["bbox"] = [1, 2, 3]
    elif case == "duplicate_image":
        data["images"][1]["id"] = 10
    elif case == "string_id":
        data["images"][0]["id"] = "10"
    return data


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no_images", "missing required key 'images'"),
        ("no_categories", "missing required key 'categories'"),
        ("no_annotations", "missing required key 'annotations'"),
        ("unknown_image", "annotation id 1 refers to image_id 99"),
        ("unknown_category", "annotation id 3 refers to category_id 3"),
        ("bad_bbox", "annotation id 1 has bbox [1, 2, 3]"),
        ("duplicate_image", "image id 10 appears twice"),
        ("string_id", "images[0].id must be an integer"),
    ],
)
def test_bad_annotation_file_is_one_line_error(tmp_path, case, expected):
    images, ann = write_coco(tmp_path, _broken(base_coco(), case))
    with pytest.raises(DatasetError) as err:
        CocoDetection(images, ann, train=True)
    message = str(err.value)
    assert message.startswith(str(ann)) and expected in message and "\n" not in message


def test_malformed_json_names_line_and_column(tmp_path):
    images, ann = write_coco(tmp_path, '{"images": [],\n  "annotations": [}\n')
    with pytest.raises(DatasetError, match=r"ann\.json: malformed JSON at line 2 column 19"):
        CocoDetection(images, ann, train=True)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json", train=True)


def test_missing_images_reports_first_and_count(tmp_path):
    data = base_coco()
    data["images"].append({"id": 30, "file_name": "c.png", "width": 40, "height": 30})
    images, ann = write_coco(tmp_path, data, skip=("b.png", "c.png"))
    with pytest.raises(DatasetError) as err:
        CocoDetection(images, ann, train=True)
    assert str(ann) in str(err.value)
    assert "2 of 3 image files are missing" in str(err.value) and "first: b.png" in str(err.value)


def test_non_positive_boxes_dropped_with_warning(tmp_path):
    data = base_coco()
    data["annotations"][0]["bbox"] = [2, 3, 0, 8]
    data["annotations"][2]["bbox"] = [2, 3, 5, -1]
    images, ann = write_coco(tmp_path, data)
    with pytest.warns(
        DatasetWarning,
        match=r"dropped 2 annotations with non-positive box "
        r"width or height \(first: annotation id 1",
    ):
        ds = CocoDetection(images, ann, train=True)
    assert ds[0][1].labels.tolist() == [0] and len(ds[1][1]) == 0
    assert len(ds.index.repairs) == 1 and str(ann) in ds.index.repairs[0]


def test_boxes_outside_clipped_or_dropped(tmp_path):
    data = base_coco()
    data["annotations"][0]["bbox"] = [-5, 20, 15, 20]  # clipped to [0, 20, 10, 30]
    data["annotations"][1]["bbox"] = [50, 5, 10, 10]  # entirely right of the image
    data["annotations"][2]["bbox"] = [0, 0, 40.4, 30]  # float rounding: clipped silently
    images, ann = write_coco(tmp_path, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(images, ann, train=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert any("clipped 1 boxes extending outside" in m for m in messages)
    assert any("dropped 1 boxes lying entirely outside" in m for m in messages)
    assert len(messages) == 2 and all(m.startswith(str(ann)) for m in messages)
    _, target = ds[0]
    assert target.labels.tolist() == [2]
    torch.testing.assert_close(_abs_xyxy(target), torch.tensor([[0.0, 20, 10, 30]]))
    torch.testing.assert_close(_abs_xyxy(ds[1][1]), torch.tensor([[0.0, 0, 40, 30]]))


def test_json_size_disagreeing_with_file_uses_file(tmp_path):
    data = base_coco()
    data["annotations"][2]["bbox"] = [30, 0, 30, 30]  # fits the 80 px wide file, not 40
    images, ann = write_coco(tmp_path, data, sizes={"b.png": (80, 30)})
    with pytest.warns(
        DatasetWarning,
        match="1 images have a width/height different.*b.png: JSON 40x30, file 80x30",
    ):
        ds = CocoDetection(images, ann, train=True)
    _, target = ds[1]
    assert target.orig_size == (30, 80)
    torch.testing.assert_close(_abs_xyxy(target), torch.tensor([[30.0, 0, 60, 30]]))


def test_unchecked_size_mismatch_caught_when_read(tmp_path):
    data = copy.deepcopy(base_coco())
    images, ann = write_coco(tmp_path, data, sizes={"b.png": (20, 30)})
    ds = CocoDetection(images, ann, train=True, check_image_sizes=False)
    with pytest.warns(DatasetWarning, match="b.png is 20x30 on disk"):
        _, target = ds[1]
    torch.testing.assert_close(_abs_xyxy(target), torch.tensor([[0.0, 0, 20, 30]]))
