"""Converters from upstream checkpoint formats to detrkit models.

``from_official`` loads checkpoints of the original research code (DETR, Deformable DETR,
DAB-DETR, DN-DETR, DINO); one module per upstream family does the key mapping.
"""

from detrkit.convert.huggingface import is_huggingface_dir, load_huggingface
from detrkit.convert.keymap import ConversionError
from detrkit.convert.official import (
    FamilyConverter,
    OfficialModel,
    available_families,
    coco_label_map,
    detect_family,
    from_official,
    load_official,
    official_to_config,
    to_official_state_dict,
)
from detrkit.convert.state_io import OfficialCheckpoint, read_checkpoint

__all__ = [
    "ConversionError",
    "FamilyConverter",
    "OfficialCheckpoint",
    "OfficialModel",
    "available_families",
    "coco_label_map",
    "detect_family",
    "from_official",
    "is_huggingface_dir",
    "load_huggingface",
    "load_official",
    "official_to_config",
    "read_checkpoint",
    "to_official_state_dict",
]
