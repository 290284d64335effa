"""Detection data: COCO-JSON datasets validated at load (VOC and YOLO through a COCO
conversion, layouts discovered by :func:`resolve_splits`), the synthetic shapes generator, DETR
transforms on ``torchvision.transforms.v2``, padding collate and builders from the config.

Importing this package only defines :class:`DatasetError` / :class:`DatasetWarning`; the other
names are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from detrkit.data.errors import DatasetError, DatasetWarning

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "CocoDetection",
    "VocDetection",
    "read_image",
    "build_transforms",
    "collate",
    "images_to_batch",
    "generate_shapes",
    "SyntheticPaths",
    "build_datasets",
    "build_loader",
    "check_dataset",
    "check_splits",
    "dataset_classes",
    "resolve_splits",
    "detect_format",
    "split_to_coco",
    "convert_dataset",
    "yolo_to_coco",
    "read_data_yaml",
]

_LAZY = {
    "CocoDetection": "detrkit.data.coco",
    "VocDetection": "detrkit.data.voc",
    "read_image": "detrkit.data.images",
    "build_transforms": "detrkit.data.transforms",
    "collate": "detrkit.data.collate",
    "images_to_batch": "detrkit.data.collate",
    "generate_shapes": "detrkit.data.synthetic",
    "SyntheticPaths": "detrkit.data.synthetic",
    "build_datasets": "detrkit.data.build",
    "build_loader": "detrkit.data.build",
    "check_dataset": "detrkit.data.check",
    "check_splits": "detrkit.data.check",
    "dataset_classes": "detrkit.data.formats",
    "split_to_coco": "detrkit.data.formats",
    "resolve_splits": "detrkit.data.discover",
    "detect_format": "detrkit.data.discover",
    "convert_dataset": "detrkit.data.convert",
    "yolo_to_coco": "detrkit.data.yolo",
    "read_data_yaml": "detrkit.data.yolo",
}

if TYPE_CHECKING:  # pragma: no cover
    from detrkit.data.build import build_datasets, build_loader
    from detrkit.data.check import check_dataset, check_splits
    from detrkit.data.coco import CocoDetection
    from detrkit.data.collate import collate, images_to_batch
    from detrkit.data.convert import convert_dataset
    from detrkit.data.discover import detect_format, resolve_splits
    from detrkit.data.formats import dataset_classes, split_to_coco
    from detrkit.data.images import read_image
    from detrkit.data.synthetic import SyntheticPaths, generate_shapes
    from detrkit.data.transforms import build_transforms
    from detrkit.data.voc import VocDetection
    from detrkit.data.yolo import read_data_yaml, yolo_to_coco


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detrkit.data' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
