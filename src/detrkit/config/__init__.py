"""Typed configuration tree of detrkit.

Every run is described by one :class:`Config`: a tree of dataclasses whose fields carry their
types (``Literal`` for choices), loaded from / dumped to YAML and overridden with
``--set a.b=c`` strings (:mod:`detrkit.config.io`); cross-field rules are in
:mod:`detrkit.config.validate`. Named configurations live in :mod:`detrkit.presets`.
Only :func:`detrkit.models.build_model` turns the model part of this tree into modules.
"""

from detrkit.config.errors import ConfigError
from detrkit.config.io import (
    apply_overrides,
    coerce,
    config_diff,
    from_dict,
    merge,
    merge_keywords,
    read_config_file,
    save_config,
    to_dict,
)
from detrkit.config.model import (
    BackboneConfig,
    DenoisingConfig,
    HeadConfig,
    ModelConfig,
    NeckConfig,
    PositionConfig,
    QueryConfig,
    TransformerConfig,
)
from detrkit.config.schema import (
    AugmentConfig,
    Config,
    DataConfig,
    EmaConfig,
    LossConfig,
    MatcherConfig,
    PostprocessConfig,
    SyntheticConfig,
    TileConfig,
    TrainConfig,
)
from detrkit.config.validate import fit_class_count, fit_to_classes

__all__ = [
    "BackboneConfig",
    "NeckConfig",
    "PositionConfig",
    "TransformerConfig",
    "QueryConfig",
    "HeadConfig",
    "DenoisingConfig",
    "ModelConfig",
    "MatcherConfig",
    "LossConfig",
    "PostprocessConfig",
    "SyntheticConfig",
    "AugmentConfig",
    "DataConfig",
    "TileConfig",
    "EmaConfig",
    "TrainConfig",
    "Config",
    "ConfigError",
    "coerce",
    "config_diff",
    "from_dict",
    "to_dict",
    "merge",
    "merge_keywords",
    "apply_overrides",
    "read_config_file",
    "save_config",
    "fit_class_count",
    "fit_to_classes",
]
