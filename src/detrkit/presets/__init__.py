"""Named configurations: the published systems at their official settings (one module per
family), plus tiny variants (``test_*``) that build and train in seconds on a CPU.

``list_presets()`` drives the test suite, so every preset here is built and run
automatically. :func:`load_config` reads a YAML file that may start from a preset.
"""

from __future__ import annotations

from pathlib import Path

from detrkit.config import Config, apply_overrides, from_dict, merge, read_config_file
from detrkit.presets import dab, deformable, detr, dino, tiny  # noqa: F401  (they register)
from detrkit.presets.registry import get_preset, list_presets, register

__all__ = ["register", "get_preset", "list_presets", "load_config"]


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, validate: bool = True
) -> Config:
    """Read a YAML config (``preset: NAME`` starts from that preset; missing keys keep their
    defaults), apply ``--set`` overrides, validate (unless ``validate=False``)."""
    preset, data = read_config_file(path)
    cfg = merge(get_preset(preset), data) if preset is not None else from_dict(data)
    cfg = apply_overrides(cfg, overrides or [])
    return cfg.validate() if validate else cfg
