"""Datasets and loaders from the ``data`` section of the config."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from detrkit.config import ConfigError, DataConfig
from detrkit.data.coco import CocoDetection
from detrkit.data.collate import collate
from detrkit.data.synthetic import generate_shapes
from detrkit.data.transforms import build_transforms
from detrkit.structures import LabelMap

__all__ = ["build_datasets", "build_loader", "loader_workers", "SeededSamples"]


def build_datasets(data: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` datasets: training transforms (DETR augmentation) on train, the
    validation resize on val. The val set uses the train set's label map.

    ``format="synthetic"`` first generates the shapes dataset under ``data.root`` (a no-op
    when it is already there with the same settings). ``coco`` / ``voc`` / ``yolo`` / ``auto``
    read ``data.dataset`` and / or ``data.{train,val}_{images,annotations}``
    (:func:`~detrkit.data.discover.resolve_splits`), converted to COCO JSON where needed
    (:func:`~detrkit.data.formats.split_to_coco`; ``annotations_file`` is what the COCO
    evaluator reads), with ``data.rename`` applied; ``auto`` prints one line saying what it
    found. Every format gives :class:`CocoDetection` (targets: normalised cxcywh boxes).
    """
    train_tf = build_transforms(data.augment, data.mean, data.std, train=True)
    val_tf = build_transforms(data.augment, data.mean, data.std, train=False)
    train_split, val_split = _splits(data)
    if data.tiles.size is not None:
        train_split = _tiled(train_split, data, all_tiles=False)
        if data.tiles.val:
            val_split = _tiled(val_split, data, all_tiles=True)
    train = CocoDetection(
        train_split.images_dir,
        train_split.annotations_file,
        train_tf,
        train=True,
        label_map=train_split.label_map,
        source=train_split.source,
    )
    val = CocoDetection(
        val_split.images_dir,
        val_split.annotations_file,
        val_tf,
        train=False,
        label_map=train.label_map,
        source=val_split.source,
    )
    return train, val


@dataclass
class _Split:
    """One split as COCO: image folder, COCO JSON, label map (None: from the JSON) and the
    file that repair messages name (None: the JSON)."""

    images_dir: Path
    annotations_file: Path
    label_map: LabelMap | None = None
    source: str | None = None


def _splits(data: DataConfig) -> tuple[_Split, _Split]:
    """The train and val splits of ``data`` as COCO (generated, read or converted)."""
    if data.format == "synthetic":
        if data.dataset:
            raise ConfigError(
                "data.dataset: set data.format=auto (or coco, voc, yolo) to read a dataset; "
                "data.format=synthetic generates one"
            )
        paths = generate_shapes(Path(data.root), data.synthetic)
        return (
            _Split(paths.train_images, paths.train_annotations),
            _Split(paths.val_images, paths.val_annotations),
        )
    from detrkit.data.discover import resolve_splits
    from detrkit.data.formats import split_to_coco

    splits = resolve_splits(data)
    if splits.note:
        print(splits.note)
    train = split_to_coco(splits.train, data.rename)
    val = split_to_coco(splits.val, data.rename, train.label_map)
    return (
        _Split(train.images_dir, train.annotations_file, train.label_map, train.source),
        _Split(val.images_dir, val.annotations_file, train.label_map, val.source),
    )


def _tiled(split: _Split, data: DataConfig, all_tiles: bool) -> _Split:
    """The split cut into ``data.tiles`` tiles (cached; every tile of a validation split)."""
    from detrkit.data.tiles import tile_coco

    images_dir, annotations = tile_coco(
        split.images_dir,
        split.annotations_file,
        data.tiles,
        all_tiles=all_tiles,
        source=split.source,
    )
    return _Split(images_dir, annotations, split.label_map, split.source)


class SeededSamples(Dataset):
    """``dataset`` whose item ``i`` is drawn with torch's generator seeded by ``(seed, i)``.

    The random augmentation of a sample then depends on the epoch's seed and the sample
    alone, not on which loader worker made it or on how many samples came before: the same
    with 0 or N workers, and a run resumed in the middle of an epoch draws what an
    uninterrupted one would. The caller's generator state is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # two seeds far apart in the 64-bit space for neighbouring (seed, index) pairs
            torch.manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))
            return self.dataset[index]


def loader_workers(requested: int | None) -> int:
    """``data.num_workers`` resolved: ``None`` is one worker per core beyond the first (at
    most 4) where the platform forks processes (Linux), else 0 (spawning a worker re-imports
    everything, which costs more than it saves on small runs)."""
    if requested is not None:
        return requested
    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int | None,
    seed: int,
    skip_batches: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A DataLoader yielding ``(ImageBatch, list[Target])`` (see :func:`collate`).

    train: the samples in the order of ``torch.randperm`` seeded by ``seed``, each drawn with
    its own seeded generator (:class:`SeededSamples`), so ``seed`` fixes the order and the
    augmentation whatever ``num_workers``; ``skip_batches`` leaves out the first batches of
    that order (resuming inside an epoch). Not train: in order. drop_last is False in both.
    num_workers: see :func:`loader_workers`.
    shard: ``(rank, world_size)`` of a multi-process run: the process's share of the order,
        every ``world_size``-th sample from ``rank``. In training the order is first padded
        by repeating its start to a multiple of ``world_size`` (every process runs the same
        number of steps), so step ``k`` of ``N`` processes with batch ``b`` sees the samples of
        step ``k`` of one process with batch ``N * b``; in evaluation nothing is repeated
        (each image is scored once; the shards may differ by one image).
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(
            f"build_loader: shard {shard} is not (rank, world_size) with rank < world_size"
        )
    n = len(dataset)  # type: ignore[arg-type]
    if train:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        order = (order + (order * world)[: (-n) % world])[rank::world]
        sampler: list[int] | None = order[skip_batches * batch_size :]
        dataset = SeededSamples(dataset, seed)
    else:
        sampler = list(range(n))[rank::world][skip_batches * batch_size :]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=loader_workers(num_workers),
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
        # the workers' base seed comes from here, not from (and not advancing) torch's global
        # generator, which the model's own draws (denoising noise, dropout) must find as saved
        generator=torch.Generator().manual_seed(seed),
    )
