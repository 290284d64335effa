"""From model outputs to detections: post-processing (outside the model, so that it can be
tested, swapped and exported on its own)."""

from detrkit.inference.postprocess import PostProcessor, build_postprocessor

__all__ = ["PostProcessor", "build_postprocessor"]
