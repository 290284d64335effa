"""See the mechanisms of a detector on an image: deformable sampling points, attention maps,
the box of every query after every decoder layer, the encoder proposals chosen as queries,
and the denoising groups with their attention mask.

    from detrkit import Detector
    from detrkit.explain import explain, write_pictures

    det = Detector.from_checkpoint("runs/demo/checkpoint_best")
    result = explain(det.model, det.config, "photo.jpg", top_k=5)
    result.decoder_sampling[0].locations   # [Q, heads, levels, points, 2]
    write_pictures(result, "photo.jpg", "explain_out")

The tensors are collected with forward hooks (:mod:`detrkit.explain.collect`); the model's
outputs are the same with and without them. See ``docs/explain.md``.
"""

from detrkit.explain.collect import Collector, Recording
from detrkit.explain.results import (
    PICTURES,
    AttentionMap,
    DeformableSampling,
    DenoisingView,
    Explanation,
    PictureKind,
    Proposals,
    Skipped,
    Trajectory,
)
from detrkit.explain.run import explain, prepare_image
from detrkit.explain.write import Written, write_pictures

__all__ = [
    "explain",
    "prepare_image",
    "write_pictures",
    "Written",
    "Collector",
    "Recording",
    "Explanation",
    "PictureKind",
    "PICTURES",
    "Skipped",
    "DeformableSampling",
    "AttentionMap",
    "Trajectory",
    "Proposals",
    "DenoisingView",
]
