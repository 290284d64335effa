import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from detrkit.boxes import cxcywh_to_xyxy
from detrkit.config import AugmentConfig
from detrkit.data.transforms import (
    DetectionTransform,
    RandomShorterSideResize,
    RandomSizeCrop,
    build_transforms,
    detr_resize_size,
)


@pytest.mark.parametrize(
    "hw,size,max_size,expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),  # long side int(800 * 640 / 480) = 1066
        ((800, 600), 800, 1333, (1066, 800)),  # portrait
        ((500, 2000), 800, 1333, (333, 1332)),  # capped: short = int(round(1333 / 4)) = 333
        ((427, 640), 800, 1333, (800, 1199)),
        ((800, 1000), 800, 1333, (800, 1000)),  # already at size: unchanged
        ((100, 1000), 800, None, (800, 8000)),  # no cap
        ((128, 128), 144, 192, (144, 144)),
        # the official rounding of the reduced short side can overshoot max_size a little
        ((50, 502), 800, 1333, (133, 1335)),
    ],
)
def test_detr_resize_rule(hw, size, max_size, expected):
    assert detr_resize_size(*hw, size, max_size) == expected


def test_resize_rule_caps_long_side():
    for h in range(50, 3000, 97):
        for w in range(50, 3000, 113):
            oh, ow = detr_resize_size(h, w, 800, 1333)
            # capped up to the rounding of the short side (half a pixel times the aspect)
            assert max(oh, ow) <= 1333 + 0.5 * max(h, w) / min(h, w)
            if max(h, w) / min(h, w) * 800 <= 1333:
                assert min(oh, ow) == 800


def _rectangle_image(h, w, rects):
    pixels = np.zeros((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in rects:
        pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def _bright_box(image: torch.Tensor):
    """xyxy (pixel edges) of the pixels brighter than half, or None."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _target_box(out, index=0):
    h, w = out.image.shape[-2:]
    return cxcywh_to_xyxy(out.boxes_cxcywh[index]) * torch.tensor([w, h, w, h])


def test_flip_moves_box_with_image():
    image = _rectangle_image(60, 100, [(10, 20, 30, 50)])
    t = DetectionTransform([v2.RandomHorizontalFlip(p=1.0)])
    out = t(image, torch.tensor([[10.0, 20, 30, 50]]), torch.tensor([3]))
    torch.testing.assert_close(_target_box(out), torch.tensor([70.0, 20, 90, 50]))
    torch.testing.assert_close(_bright_box(out.image), torch.tensor([70.0, 20, 90, 50]))
    assert out.labels.tolist() == [3]


def test_resize_moves_box_with_image():
    image = _rectangle_image(60, 100, [(10, 20, 30, 50)])
    out = DetectionTransform([RandomShorterSideResize([120], max_size=1000)])(
        image, torch.tensor([[10.0, 20, 30, 50]]), torch.tensor([0])
    )
    assert out.image.shape == (3, 120, 200)
    torch.testing.assert_close(_target_box(out), torch.tensor([20.0, 40, 60, 100]))
    torch.testing.assert_close(_bright_box(out.image), torch.tensor([20.0, 40, 60, 100]))


def test_crop_removes_boxes_left_outside_with_their_labels():
    image = _rectangle_image(100, 100, [(40, 40, 60, 60), (0, 0, 10, 10), (85, 30, 100, 70)])
    boxes = torch.tensor([[40.0, 40, 60, 60], [0, 0, 10, 10], [85, 30, 100, 70]])
    out = DetectionTransform([v2.CenterCrop(40)])(image, boxes, torch.tensor([5, 6, 7]))
    assert out.labels.tolist() == [5]  # the corner box and the right box are cut off
    torch.testing.assert_close(_target_box(out), torch.tensor([10.0, 10, 30, 30]))
    torch.testing.assert_close(out.boxes_cxcywh, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_random_size_crop_clips_partial_box():
    image = _rectangle_image(80, 120, [(30, 20, 90, 60)])
    torch.manual_seed(0)
    crop = DetectionTransform([RandomSizeCrop(30, 50)])
    for _ in range(20):
        out = crop(image, torch.tensor([[30.0, 20, 90, 60]]), torch.tensor([1]))
        h, w = out.image.shape[-2:]
        assert 30 <= h <= 50 and 30 <= w <= 50
        bright = _bright_box(out.image)
        if bright is None:
            assert len(out.labels) == 0
        else:
            torch.testing.assert_close(_target_box(out), bright)


def test_train_pipeline_boxes_enclose_the_object():
    """The full training augmentation (flip, multi-scale, resize-crop) keeps each box on its
    bright rectangle, whatever the random draws."""
    augment = AugmentConfig(
        train_scales=[64, 80, 96],
        max_size=160,
        crop=True,
        crop_resize_scales=[70, 90],
        crop_size=[40, 70],
    )
    t = build_transforms(augment, mean=[0.5] * 3, std=[0.5] * 3, train=True)
    rects = [(10, 15, 40, 35), (60, 40, 110, 70)]
    image = _rectangle_image(80, 120, rects)
    boxes = torch.tensor([list(map(float, r)) for r in rects])
    torch.manual_seed(1)
    seen_sizes = set()
    for _ in range(40):
        out = t(image, boxes, torch.tensor([0, 1]))
        assert out.image.dtype == torch.float32 and out.image.min() >= -1.0 - 1e-5
        h, w = out.image.shape[-2:]
        seen_sizes.add((h, w))
        assert (out.boxes_cxcywh >= 0).all() and (out.boxes_cxcywh <= 1 + 1e-6).all()
        unnormalised = out.image * 0.5 + 0.5
        for k, label in enumerate(out.labels.tolist()):
            box = _target_box(out, k)
            x0, y0, x1, y1 = box.round().long().tolist()
            inside = unnormalised[0, y0:y1, x0:x1]
            assert inside.numel() > 0 and inside.mean() > 0.6, (label, box)
            # the pixels just outside the box are (mostly) dark
            grown = unnormalised[0, max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2]
            ring = grown.sum() - inside.sum()
            ring_area = grown.numel() - inside.numel()
            assert ring_area == 0 or ring / ring_area < 0.5
    assert len(seen_sizes) > 3


def test_val_transform_is_deterministic_and_normalised():
    augment = AugmentConfig(val_scale=50, max_size=80)
    t = build_transforms(augment, mean=[0.2, 0.4, 0.6], std=[0.5, 0.25, 0.1], train=False)
    image = Image.fromarray(np.full((40, 100, 3), 51, np.uint8))  # 0.2 in every channel
    out = t(image)
    assert out.boxes_cxcywh is None and out.image.shape == (3, 32, 80)
    expected = torch.tensor([0.0, -0.8, -4.0])
    torch.testing.assert_close(out.image[:, 5, 5], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(t(image).image, out.image)
    # tensors in [0, 1] give the same result as PIL images
    as_tensor = torch.full((3, 40, 100), 0.2)
    torch.testing.assert_close(t(as_tensor).image, out.image, atol=1e-5, rtol=0)
    # it draws no random numbers: evaluating must not shift the training run's stream
    state = torch.get_rng_state()
    t(image)
    assert torch.equal(torch.get_rng_state(), state)


def test_train_without_flip_or_crop_only_resizes():
    augment = AugmentConfig(hflip=False, crop=False, train_scales=[30], max_size=1000)
    t = build_transforms(augment, [0.0] * 3, [1.0] * 3, train=True)
    image = _rectangle_image(60, 100, [(0, 0, 20, 60)])
    for _ in range(5):  # never flipped: the box stays on the left
        out = t(image, torch.tensor([[0.0, 0, 20, 60]]), torch.tensor([0]))
        assert out.image.shape == (3, 30, 50)
        torch.testing.assert_close(_target_box(out), torch.tensor([0.0, 0, 10, 30]))
