"""A tiny synthetic setup shared by the engine, CLI and API tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

from detrkit.config import Config, apply_overrides
from detrkit.presets import get_preset

TINY_OVERRIDES = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=8", "data.synthetic.image_size=64",
    "data.synthetic.max_objects=2", "data.augment.train_scales=[64]", "data.augment.hflip=true",
    "data.augment.val_scale=64", "data.augment.max_size=96", "train.batch_size=4",
    "train.epochs=1", "train.max_steps_per_epoch=2", "train.device=cpu",
]


def tiny_overrides(tmp: Path) -> list[str]:
    """``--set`` strings: test_detr_tiny on 16 + 8 synthetic 64 px images under ``tmp``."""
    return [*TINY_OVERRIDES, f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'run'}"]


def tiny_config(tmp: Path, *extra: str) -> Config:
    return apply_overrides(get_preset("test_detr_tiny"),
                           [*tiny_overrides(tmp), *extra]).validate()
