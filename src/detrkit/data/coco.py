"""COCO-JSON detection datasets, validated when they load.

:class:`CocoDetection` serves the images and targets of an index read by :func:`load_coco_index`
(in :mod:`detrkit.data.coco_index`, whose docstring lists what is checked and what repaired):
a broken dataset fails with a one-line :class:`DatasetError` naming the file and the problem
before any training starts; repairable problems are repaired, each kind reported by one
:class:`DatasetWarning` naming the file and counting the cases.

Crowd annotations (``iscrowd=1``) are never part of the targets; they stay in the JSON file,
which the evaluator reads itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from detrkit.data.coco_index import CocoIndex, ImageRecord, load_coco_index
from detrkit.data.errors import DatasetWarning
from detrkit.data.images import read_image
from detrkit.data.transforms import DetectionTransform
from detrkit.structures import LabelMap, Target

__all__ = ["ImageRecord", "CocoIndex", "load_coco_index", "CocoDetection"]


def clip_to_size(
    boxes_xyxy: np.ndarray, labels: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``[N, 4]`` absolute xyxy boxes to ``height x width``; drop those left empty."""
    clipped = boxes_xyxy.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], labels[keep]


class CocoDetection(Dataset):
    """A COCO-JSON detection dataset: ``dataset[i] -> (image, target)``.

    image: ``[3, H, W]`` float tensor (normalised when ``transforms`` normalise; with
    ``transforms=None`` the image as read, in [0, 1]). target: :class:`Target` with boxes
    ``[N, 4]`` normalised cxcywh relative to the transformed image, labels ``[N]`` int64
    contiguous (category ids sorted ascending -> ``0 .. C-1``, see ``label_map``), image_id
    the COCO id, orig_size ``(h, w)`` on disk, size ``(h, w)`` after transforms. Images without
    annotations give empty targets (``[0, 4]`` / ``[0]``). Crowd boxes are never in targets.

    Validation and repairs happen at construction (:func:`load_coco_index`): bad input raises
    :class:`DatasetError`; boxes with non-positive width/height are dropped, boxes outside the
    image clipped (or dropped when entirely outside) and JSON sizes that disagree with the
    files replaced by the files' sizes, each with a :class:`DatasetWarning` counting the cases.

    train: whether this is a training split (recorded as ``self.train``; targets are built the
    same way in both cases). label_map: use this class mapping (e.g. the training set's)
    instead of the file's own. check_image_sizes, source: see :func:`load_coco_index`.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_file: str | Path,
        transforms: DetectionTransform | None = None,
        *,
        train: bool,
        label_map: LabelMap | None = None,
        check_image_sizes: bool = True,
        source: str | None = None,
    ) -> None:
        self.index = load_coco_index(
            images_dir,
            annotations_file,
            label_map=label_map,
            check_image_sizes=check_image_sizes,
            source=source,
        )
        self.images_dir = self.index.images_dir
        self.annotations_file = self.index.annotations_file
        self.label_map = self.index.label_map
        self.image_ids = [r.image_id for r in self.index.records]
        self.transforms = transforms if transforms is not None else DetectionTransform([])
        self.train = train

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        record = self.index.records[i]
        image = read_image(record.path)
        boxes, labels = record.boxes_xyxy, record.labels
        if (image.height, image.width) != (record.height, record.width):
            warnings.warn(
                f"{self.annotations_file}: image {record.file_name} is "
                f"{image.width}x{image.height} on disk, not {record.width}x"
                f"{record.height} as in the JSON; clipping its boxes to the file's "
                "size",
                DatasetWarning,
                stacklevel=2,
            )
            boxes, labels = clip_to_size(boxes, labels, image.height, image.width)
        out = self.transforms(image, torch.from_numpy(boxes), torch.from_numpy(labels))
        assert out.boxes_cxcywh is not None and out.labels is not None
        size = (int(out.image.shape[-2]), int(out.image.shape[-1]))
        target = Target(
            out.boxes_cxcywh, out.labels, record.image_id, size, (image.height, image.width)
        )
        return out.image, target
