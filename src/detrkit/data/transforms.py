"""Detection transforms on ``torchvision.transforms.v2``: the DETR augmentation.

During the pipeline boxes are ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels, so every
geometric step (flip, resize, crop) moves them with the image. At the end the image becomes a
normalised float tensor ``[3, h, w]`` and the boxes normalised cxcywh relative to ``(h, w)``;
boxes left without area (after a crop) are removed together with their labels.

Training (:func:`build_transforms` with ``train=True``), as in the official DETR recipe:
random horizontal flip; then with probability 0.5 either a multi-scale resize (shorter side
drawn from ``train_scales``, longer side capped at ``max_size``) or a resize to one of
``crop_resize_scales`` + a random crop of side ``crop_size[0]..crop_size[1]`` + the multi-scale
resize. Validation: resize the shorter side to ``val_scale`` (longer side capped at ``max_size``).
Random draws use torch's generator; the training loader seeds it per sample and epoch
(:class:`detrkit.data.build.SeededSamples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detrkit.boxes import xyxy_to_cxcywh
from detrkit.config import AugmentConfig

__all__ = [
    "detr_resize_size",
    "RandomShorterSideResize",
    "RandomSizeCrop",
    "Transformed",
    "DetectionTransform",
    "build_transforms",
]


def detr_resize_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side of a ``height x width`` image is resized to
    ``size`` keeping the aspect ratio, with the longer side capped at ``max_size``.

    The official DETR rule: when the longer side would exceed ``max_size``, the target shorter
    side becomes ``int(round(max_size * short / long))``; the longer side is then
    ``int(target * long / short)`` (truncated), which can exceed ``max_size`` by up to half
    the aspect ratio (as in the official code). An image whose shorter side already equals the
    target is left as it is.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = round(max_size * short / long)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """``(h, w)`` of the image among the flattened transform inputs."""
    for item in flat_inputs:
        if isinstance(item, (PIL.Image.Image, tv_tensors.Image)):
            h, w = F.get_size(item)
            return int(h), int(w)
    raise TypeError("detection transforms need a PIL image or a tv_tensors.Image input")


class RandomShorterSideResize(v2.Transform):
    """Resize so that the shorter side is one of ``sizes`` (drawn uniformly), the longer side
    capped at ``max_size`` (:func:`detr_resize_size`). Boxes follow the image."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("RandomShorterSideResize: sizes must not be empty")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        # one size (validation): draw nothing, so evaluating leaves the training stream alone
        choice = int(torch.randint(len(self.sizes), ()).item()) if len(self.sizes) > 1 else 0
        size = self.sizes[choice]
        return {"size": list(detr_resize_size(h, w, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random region of width and height drawn uniformly from ``[min_size, max_size]``
    (each limited to the image side), at a uniformly random position. Boxes are shifted and
    clipped to the crop; boxes without area are removed later by :class:`DetectionTransform`."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(
                f"RandomSizeCrop: need 1 <= min_size <= max_size, got [{min_size}, {max_size}]"
            )
        self.min_size, self.max_size = int(min_size), int(max_size)

    def _draw(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, ()).item())

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        max_w, max_h = min(w, self.max_size), min(h, self.max_size)
        crop_w = self._draw(min(self.min_size, max_w), max_w)
        crop_h = self._draw(min(self.min_size, max_h), max_h)
        top, left = self._draw(0, h - crop_h), self._draw(0, w - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class Transformed(NamedTuple):
    """Output of :class:`DetectionTransform`.

    image: ``[3, h, w]`` float (normalised when the transform has mean/std, else in [0, 1]).
    boxes_cxcywh: ``[N, 4]`` normalised cxcywh relative to ``(h, w)``, or None without boxes.
    labels: ``[N]`` int64, or None without boxes.
    """

    image: Tensor
    boxes_cxcywh: Tensor | None
    labels: Tensor | None


class DetectionTransform:
    """Geometric v2 transforms on (image, absolute xyxy boxes), then to float + normalise.

    geometric: v2 transforms applied to the image and the boxes together (may be empty).
    mean / std: per-channel normalisation (RGB, images scaled to [0, 1] first); None skips it.
    """

    def __init__(
        self,
        geometric: Sequence[v2.Transform],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("DetectionTransform: give both mean and std, or neither")
        self.geometric = v2.Compose(list(geometric)) if geometric else None
        tail: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if mean is not None and std is not None:
            tail.append(v2.Normalize(list(mean), list(std)))
        self.to_tensor = v2.Compose(tail)

    def __call__(
        self,
        image: PIL.Image.Image | Tensor,
        boxes_xyxy: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Transformed:
        """Transform one image and, optionally, its boxes.

        image: an RGB PIL image, or a ``[3, H, W]`` tensor (uint8, or float in [0, 1]).
        boxes_xyxy: ``[N, 4]`` absolute pixel xyxy in the frame of ``image``. labels: ``[N]``.
        """
        if isinstance(image, Tensor) and not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(image)
        if boxes_xyxy is None:
            if self.geometric is not None:
                image = self.geometric(image)
            out = self.to_tensor(image).as_subclass(Tensor)
            return Transformed(out, None, None)

        if labels is None or labels.shape[0] != boxes_xyxy.shape[0]:
            raise ValueError("DetectionTransform: labels must be given with one entry per box")
        h, w = _image_size([image])
        boxes = tv_tensors.BoundingBoxes(
            boxes_xyxy.to(torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        )
        if self.geometric is not None:
            image, boxes = self.geometric(image, boxes)
        out = self.to_tensor(image).as_subclass(Tensor)  # [3, h, w]
        xyxy = boxes.as_subclass(Tensor)  # [N, 4] absolute
        h, w = out.shape[-2:]
        xyxy = torch.stack(
            [
                xyxy[:, 0].clamp(0, w),
                xyxy[:, 1].clamp(0, h),
                xyxy[:, 2].clamp(0, w),
                xyxy[:, 3].clamp(0, h),
            ],
            dim=-1,
        )
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # [N]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes_cxcywh = xyxy_to_cxcywh(xyxy[keep]) / scale  # [M, 4] normalised
        return Transformed(out, boxes_cxcywh, labels[keep])


def build_transforms(
    augment: AugmentConfig, mean: Sequence[float], std: Sequence[float], train: bool
) -> DetectionTransform:
    """The DETR training augmentation (``train=True``) or the validation resize, followed by
    conversion to float and normalisation with ``mean`` / ``std`` (see the module docstring)."""
    if not train:
        return DetectionTransform(
            [RandomShorterSideResize([augment.val_scale], augment.max_size)], mean, std
        )
    geometric: list[v2.Transform] = []
    if augment.hflip:
        geometric.append(v2.RandomHorizontalFlip(p=0.5))
    multi_scale = RandomShorterSideResize(augment.train_scales, augment.max_size)
    if augment.crop:
        low, high = augment.crop_size
        crop_branch = v2.Compose(
            [
                RandomShorterSideResize(augment.crop_resize_scales),
                RandomSizeCrop(low, high),
                RandomShorterSideResize(augment.train_scales, augment.max_size),
            ]
        )
        geometric.append(v2.RandomChoice([multi_scale, crop_branch], p=[0.5, 0.5]))
    else:
        geometric.append(multi_scale)
    return DetectionTransform(geometric, mean, std)
