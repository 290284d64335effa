"""detrkit.Detector: building, saving/loading, and predict on every kind of image input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from detrkit.config import ConfigError
from detrkit.data.synthetic import generate_shapes
from detrkit.structures import LabelMap
from tests.conftest import tiny_config

NAMES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = tiny_config(tmp)
    paths = generate_shapes(tmp / "data", cfg.data.synthetic)
    images = sorted(paths.val_images.glob("*.png"))[:3]
    return cfg, images


@pytest.fixture(scope="module")
def detector(shapes):
    det = detrkit.Detector.from_preset(
        "test_detr_tiny", device="cpu", data={"augment": {"val_scale": 64, "max_size": 96}}
    )
    det.label_map = LabelMap([1, 3, 5, 7], NAMES)
    return det


def test_lazy_package_exports():
    assert detrkit.Detector.__module__ == "detrkit.api"
    assert "test_detr_tiny" in detrkit.list_presets()
    assert detrkit.get_preset("test_detr_tiny").model.num_classes == 4
    assert isinstance(detrkit.__version__, str)


def test_from_preset_applies_num_classes_and_overrides():
    det = detrkit.Detector.from_preset(
        "test_detr_tiny",
        num_classes=3,
        device="cpu",
        model={"queries": {"num_queries": 7}},
        **{"train.lr": 5e-4},
    )
    assert det.config.model.num_classes == 3 and det.config.train.lr == 5e-4
    assert det.config.model.queries.num_queries == 7
    assert det.model.transformer is not None and not det.model.training
    assert det.label_map.names == ["class_0", "class_1", "class_2"]
    with pytest.raises(ConfigError, match="model.no_such_key"):
        detrkit.Detector.from_preset("test_detr_tiny", **{"model.no_such_key": 1})


def test_predict_accepts_paths_pil_numpy_and_tensors_alike(detector, shapes):
    _, images = shapes
    path = images[0]
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    results = [
        detector.predict(x, threshold=0.0)[0]
        for x in (path, str(path), pil, array, tensor, tensor.float() / 255)
    ]
    reference = results[0]
    assert len(reference) == detector.config.model.queries.num_queries  # threshold 0: all
    for other in results[1:]:
        torch.testing.assert_close(other.boxes_xyxy, reference.boxes_xyxy, atol=1e-3, rtol=0)
        torch.testing.assert_close(other.scores, reference.scores, atol=1e-4, rtol=0)
    assert reference.image_size == (pil.height, pil.width)
    assert reference.names == [NAMES[i] for i in reference.labels.tolist()]
    assert reference.category_ids == [[1, 3, 5, 7][i] for i in reference.labels.tolist()]


def test_predict_a_list_batches_and_thresholds(detector, shapes):
    _, images = shapes
    all_preds = detector.predict(images, threshold=0.0, batch_size=2)
    assert len(all_preds) == len(images)
    one_by_one = [detector.predict(p, threshold=0.0)[0] for p in images]
    for batched, single in zip(all_preds, one_by_one):
        torch.testing.assert_close(batched.boxes_xyxy, single.boxes_xyxy, atol=1e-3, rtol=0)
    # the threshold is compared with the single-image scores: batching may move a score by
    # float rounding, which must not decide the test
    cut = float(one_by_one[0].scores.median())
    kept = detector.predict(images[0], threshold=cut)[0]
    assert len(kept) == int((one_by_one[0].scores >= cut).sum())
    assert bool((kept.scores >= cut).all())


def test_boxes_are_in_the_pixels_of_the_image_as_given(detector, shapes):
    _, images = shapes
    small = Image.open(images[0]).convert("RGB")
    big = small.resize((small.width * 2, small.height * 2), Image.BILINEAR)
    (p_small,), (p_big,) = detector.predict(small, 0.0), detector.predict(big, 0.0)
    assert p_big.image_size == (2 * small.height, 2 * small.width)
    # both are resized to the same network input, so the boxes differ by the factor 2
    torch.testing.assert_close(p_big.boxes_xyxy, 2 * p_small.boxes_xyxy, atol=1.5, rtol=0.03)


def test_save_and_from_checkpoint_round_trip(detector, shapes, tmp_path):
    _, images = shapes
    name = detector.save(tmp_path / "ckpt")
    again = detrkit.Detector.from_checkpoint(name, device="cpu")
    assert again.label_map == detector.label_map and again.config == detector.config
    (a,), (b,) = detector.predict(images[0], 0.0), again.predict(images[0], 0.0)
    assert torch.equal(a.boxes_xyxy, b.boxes_xyxy) and a.names == b.names


def test_to_coco_entries(detector, shapes):
    _, images = shapes
    (pred,) = detector.predict(images[0], threshold=0.0)
    entries = pred.to_coco(image_id=7)
    assert len(entries) == len(pred)
    x0, y0, x1, y1 = pred.boxes_xyxy[0].tolist()
    assert entries[0]["image_id"] == 7 and entries[0]["category_id"] == pred.category_ids[0]
    assert entries[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)


def test_bad_image_inputs_are_clear_errors(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.predict(np.zeros((8, 8, 3), np.float64))
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        detector.predict(torch.zeros(8, 8))
    with pytest.raises(TypeError, match="cannot read an image"):
        detector.predict(42)  # type: ignore[arg-type]


def test_bf16_predict_runs_in_bf16_and_stays_close_to_fp32(shapes):
    """precision="bf16" autocasts the forward (a linear layer sees bfloat16) and the detections
    keep their float32 scores within bfloat16 rounding of a short forward."""
    det = detrkit.Detector.from_preset(
        "test_deformable_detr_tiny",
        device="cpu",
        data={"augment": {"val_scale": 64, "max_size": 96}},
    )
    _, images = shapes
    reference = det.predict(images[0], threshold=0.0)[0]
    seen = []
    hook = det.model.transformer.decoder.layers[0].linear1.register_forward_hook(
        lambda m, args, out: seen.append(out.dtype)
    )
    det.precision = "bf16"
    try:
        got = det.predict(images[0], threshold=0.0)[0]
    finally:
        hook.remove()
        det.precision = "fp32"
    assert seen == [torch.bfloat16]
    assert got.scores.dtype == torch.float32 and len(got) == len(reference)
    top_ref, top_got = (
        reference.scores.sort(descending=True)[0],
        got.scores.sort(descending=True)[0],
    )
    torch.testing.assert_close(top_got[:10], top_ref[:10], atol=0.02, rtol=0)


def test_bad_precision_is_one_clear_error(detector):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        detector.precision = "fp16"
    with pytest.raises(ValueError, match="not one of"):
        detector.precision = "int8"  # type: ignore[assignment]
    assert detector.precision == "fp32"
