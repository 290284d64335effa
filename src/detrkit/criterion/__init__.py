"""Training losses: the Hungarian matcher, the set criterion over every decoder layer and the
encoder proposals, the denoising loss and the focal loss."""

from detrkit.criterion.denoising import DenoisingLoss, denoising_loss, denoising_term_names
from detrkit.criterion.focal import sigmoid_focal_loss
from detrkit.criterion.matcher import HungarianMatcher, MatchIndices
from detrkit.criterion.set_loss import LossOutput, SetCriterion, build_criterion

__all__ = [
    "HungarianMatcher",
    "MatchIndices",
    "SetCriterion",
    "LossOutput",
    "build_criterion",
    "DenoisingLoss",
    "denoising_loss",
    "denoising_term_names",
    "sigmoid_focal_loss",
]
