"""The rules of the ``data`` section of the config (run by :meth:`Config.validate`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from detrkit.config.errors import ConfigError, require

if TYPE_CHECKING:
    from detrkit.config.schema import DataConfig, TileConfig

__all__ = ["check_data", "check_tile_config"]


def check_tile_config(tiles: TileConfig, key: str = "data.tiles") -> None:
    """Raise :class:`ConfigError` (``"data.tiles.<field>: <problem>"``) on invalid settings."""

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    size = tiles.size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{key}.size: must be a positive integer (pixels) or null, got {size!r}")
    if not number(tiles.overlap) or not 0.0 <= tiles.overlap < 1.0:
        raise ConfigError(f"{key}.overlap: must be in [0, 1), got {tiles.overlap!r}")
    if not number(tiles.min_visibility) or not 0.0 <= tiles.min_visibility <= 1.0:
        raise ConfigError(f"{key}.min_visibility: must be in [0, 1], got {tiles.min_visibility!r}")
    if (
        not number(tiles.empty_ratio)
        or not math.isfinite(tiles.empty_ratio)
        or tiles.empty_ratio < 0
    ):
        raise ConfigError(f"{key}.empty_ratio: must be a number >= 0, got {tiles.empty_ratio!r}")
    if not isinstance(tiles.val, bool):
        raise ConfigError(f"{key}.val: must be true or false, got {tiles.val!r}")
    if isinstance(tiles.seed, bool) or not isinstance(tiles.seed, int):
        raise ConfigError(f"{key}.seed: must be an integer, got {tiles.seed!r}")


def check_data(d: DataConfig) -> None:
    """The rules of the ``data`` section."""
    require(
        len(d.mean) == 3 and len(d.std) == 3,
        "data.mean",
        "data.mean and data.std need 3 values (RGB)",
    )
    require(
        d.num_workers is None or d.num_workers >= 0,
        "data.num_workers",
        f"must be >= 0 or null (one per spare core), got {d.num_workers}",
    )
    require(
        not (d.format == "synthetic" and d.dataset),
        "data.dataset",
        "set data.format=auto (or coco, voc, yolo) to read a dataset; data.format=synthetic "
        "generates one",
    )
    if d.format != "synthetic" and not d.dataset:
        for split in ("train", "val"):
            require(
                getattr(d, f"{split}_images") is not None,
                f"data.{split}_images",
                f"required when data.format={d.format} and data.dataset is not set",
            )
        if d.format == "coco":
            for key in ("train_annotations", "val_annotations"):
                require(
                    getattr(d, key) is not None, f"data.{key}", "required when data.format=coco"
                )
    require(
        all(isinstance(k, str) and isinstance(v, str) and v for k, v in d.rename.items()),
        "data.rename",
        "maps class names to class names, e.g. {Alive: Tree, Dead: Tree}",
    )
    check_tile_config(d.tiles)
    s = d.synthetic
    require(
        1 <= s.min_objects <= s.max_objects,
        "data.synthetic.min_objects",
        "need 1 <= min_objects <= max_objects",
    )
    require(len(d.augment.crop_size) == 2, "data.augment.crop_size", "needs [min, max]")
