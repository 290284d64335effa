"""Datasets and loaders from the ``data`` section of the config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from detrkit.config import ConfigError, DataConfig
from detrkit.data.coco import CocoDetection
from detrkit.data.collate import collate
from detrkit.data.synthetic import generate_shapes
from detrkit.data.transforms import build_transforms

__all__ = ["build_datasets", "build_loader"]


def build_datasets(data: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` datasets: training transforms (DETR augmentation) on train, the
    validation resize on val. The val set uses the train set's label map.

    ``format="synthetic"`` first generates the shapes dataset under ``data.root`` (a no-op
    when it is already there with the same settings); ``format="coco"`` reads
    ``data.{train,val}_{images,annotations}``.
    """
    if data.format == "synthetic":
        paths = generate_shapes(Path(data.root), data.synthetic)
        train_images, train_ann = paths.train_images, paths.train_annotations
        val_images, val_ann = paths.val_images, paths.val_annotations
    else:
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if getattr(data, key) is None:
                raise ConfigError(f"data.{key}: required when data.format=coco")
        train_images, train_ann = Path(data.train_images), Path(data.train_annotations)
        val_images, val_ann = Path(data.val_images), Path(data.val_annotations)
    train = CocoDetection(
        train_images,
        train_ann,
        build_transforms(data.augment, data.mean, data.std, train=True),
        train=True,
    )
    val = CocoDetection(
        val_images,
        val_ann,
        build_transforms(data.augment, data.mean, data.std, train=False),
        train=False,
        label_map=train.label_map,
    )
    return train, val


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int
) -> DataLoader:
    """A DataLoader yielding ``(ImageBatch, list[Target])`` (see :func:`collate`).

    train: shuffle with a torch generator seeded by ``seed`` (the same seed gives the same
    order; worker seeds derive from it too). drop_last is False in both modes.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=False,
        generator=generator,
        persistent_workers=False,
    )
