"""The detector (:class:`DetectionModel`), its parts, and :func:`build_model`."""

from detrkit.models.backbone import FrozenBatchNorm2d, ResNetBackbone
from detrkit.models.detector import (
    DetectionModel,
    build_model,
    build_position_encoding,
    build_transformer,
)
from detrkit.models.embeddings import MLP
from detrkit.models.neck import FeatureProjection
from detrkit.models.position import LearnedPositionEncoding, SinePositionEncoding
from detrkit.models.transformer import DetectionTransformer

__all__ = [
    "DetectionModel",
    "build_model",
    "build_transformer",
    "build_position_encoding",
    "DetectionTransformer",
    "ResNetBackbone",
    "FrozenBatchNorm2d",
    "FeatureProjection",
    "SinePositionEncoding",
    "LearnedPositionEncoding",
    "MLP",
]
