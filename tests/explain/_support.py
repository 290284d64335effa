"""What the explain tests share: tiny detectors on 64 px inputs and their explanations, cached
(do not modify the cached results)."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from detrkit.api import Detector
from detrkit.explain import Explanation, explain

# DETR (global), Deformable two-stage + refine, DAB (conditional, look-forward-twice anchors),
# DN-DETR (global, dn groups), DINO (mixed selection, cdn, look forward twice)
PRESETS = [
    "test_detr_tiny",
    "test_deformable_detr_tiny_two_stage",
    "test_dab_detr_tiny",
    "test_dn_detr_tiny",
    "test_dino_tiny",
]
DEFORMABLE = ["test_deformable_detr_tiny_two_stage", "test_dino_tiny"]
GLOBAL = ["test_detr_tiny", "test_dab_detr_tiny", "test_dn_detr_tiny"]
DENOISING = ["test_dn_detr_tiny", "test_dino_tiny"]
SMALL_INPUT = {"data": {"augment": {"val_scale": 64, "max_size": 96}}}


def image(h: int = 60, w: int = 84, seed: int = 0) -> np.ndarray:
    """A random ``HWC`` uint8 RGB image."""
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@cache
def detector(preset: str) -> Detector:
    """A randomly initialised tiny detector (seeded, weights perturbed so that attention is
    not uniform), resizing its inputs to 64 px."""
    torch.manual_seed(0)
    det = Detector.from_preset(preset, device="cpu", **SMALL_INPUT)
    with torch.no_grad():
        for p in det.model.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return det


@cache
def explained(preset: str) -> Explanation:
    det = detector(preset)
    return explain(det.model, det.config, image(), top_k=3)
