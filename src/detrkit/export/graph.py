"""What gets exported: the detector in eval mode behind one of two contracts.

* raw (default): ``images`` float32 ``[B, 3, H, W]`` normalised with the model's mean / std,
  optional ``mask`` bool ``[B, H, W]`` (True = padding; without it the graph assumes no
  padding) -> ``logits`` ``[B, Q, C]``, ``boxes`` ``[B, Q, 4]`` normalised cxcywh: the tensors of
  the PyTorch model.
* deploy (``topk``): plus ``orig_sizes`` int64 ``[B, 2]`` ``(h, w)`` -> ``scores`` ``[B, K]``,
  ``labels`` int64 ``[B, K]`` (contiguous class indices), ``boxes_xyxy`` ``[B, K, 4]`` in pixels
  of the original images: what :meth:`detrkit.Detector.predict` returns before thresholding.

Training-only parts (denoising) never enter the graph: the model is exported in eval mode and
without targets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from detrkit.inference.postprocess import PostProcessor
from detrkit.ops.msda import MSDeformAttn

__all__ = ["MsdaPath", "RawGraph", "DeployGraph", "msda_backend", "example_inputs"]

MsdaPath = Literal["grid_sample", "gather"]


class RawGraph(nn.Module):
    """The raw contract around a :class:`~detrkit.models.DetectionModel`."""

    def __init__(self, model: nn.Module, with_mask: bool = True) -> None:
        super().__init__()
        self.model, self.with_mask = model, with_mask

    def _detect(self, images: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is None:
            mask = torch.zeros_like(images[:, 0], dtype=torch.bool)  # [B, H, W]
        out = self.model(images, mask)
        return out.logits, out.boxes

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``images`` ``[B, 3, H, W]``, ``mask`` ``[B, H, W]`` -> logits, boxes."""
        return self._detect(images, mask)


class DeployGraph(RawGraph):
    """The deploy contract: the raw outputs post-processed to ``k`` detections per image."""

    def __init__(self, model: nn.Module, postprocessor: PostProcessor,
                 with_mask: bool = True) -> None:  # fmt: skip
        super().__init__(model, with_mask)
        self.postprocessor = postprocessor

    def forward(  # type: ignore[override]
        self, images: Tensor, mask: Tensor | None = None, orig_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``orig_sizes`` ``[B, 2]`` ``(h, w)`` -> scores ``[B, K]``, labels ``[B, K]``,
        boxes_xyxy ``[B, K, 4]``."""
        logits, boxes = self._detect(images, mask)
        scores, labels, boxes_xyxy, _ = self.postprocessor.batched(logits, boxes, orig_sizes)
        return scores, labels, boxes_xyxy


@contextlib.contextmanager
def msda_backend(model: nn.Module, path: MsdaPath) -> Iterator[None]:
    """Every deformable attention of ``model`` samples with ``path`` (``grid_sample``: the
    reference backend; ``gather``: explicit gathers) inside the block, as before after it."""
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    before = [m.backend for m in modules]
    for m in modules:
        m.backend = "reference" if path == "grid_sample" else "gather"
    try:
        yield
    finally:
        for m, backend in zip(modules, before):
            m.backend = backend


def example_inputs(batch: int, height: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random normalised images ``[batch, 3, height, width]`` and a mask in which every image
    after the first is padded on the right and bottom (so that padding takes part)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=gen)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, height - height // (3 + b) :, :] = True
        mask[b, :, width - width // (2 + b) :] = True
        images[b][:, mask[b]] = 0.0
    return images, mask
