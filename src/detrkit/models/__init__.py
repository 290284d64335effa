"""Model building blocks and the :class:`Detector` (see :mod:`detrkit.models.detector`)."""

from detrkit.models.backbone import FrozenBatchNorm2d, ResNetBackbone
from detrkit.models.detector import Detector, build_model, build_position_encoding
from detrkit.models.heads import MLP
from detrkit.models.interface import DetectionTransformer
from detrkit.models.neck import ConvProjection, MultiLevelProjection
from detrkit.models.position import LearnedPositionEncoding, SinePositionEncoding
from detrkit.models.transformer import DETRTransformer

__all__ = [
    "Detector",
    "build_model",
    "build_position_encoding",
    "DetectionTransformer",
    "DETRTransformer",
    "ResNetBackbone",
    "FrozenBatchNorm2d",
    "ConvProjection",
    "MultiLevelProjection",
    "SinePositionEncoding",
    "LearnedPositionEncoding",
    "MLP",
]
