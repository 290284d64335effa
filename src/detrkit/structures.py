"""The typed values that flow between data, model, criterion and post-processing.

Conventions used everywhere in detrkit:

* ``boxes_cxcywh``: ``(cx, cy, w, h)`` normalised to ``[0, 1]`` by the *unpadded* image size.
* ``boxes_xyxy``: ``(x0, y0, x1, y1)``; absolute pixels unless the name or docstring says otherwise.
* padding masks are bool with ``True`` on padding pixels / tokens.
* class labels are contiguous indices ``0 .. num_classes-1``; :class:`LabelMap` maps them back
  to the dataset's category ids and names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    import supervision

__all__ = [
    "ImageBatch",
    "Target",
    "LayerOutput",
    "ProposalOutput",
    "DenoisingMeta",
    "DenoisingOutput",
    "DetectorOutput",
    "Detections",
    "LabelMap",
    "Prediction",
]


@dataclass
class ImageBatch:
    """A padded batch of normalised images.

    images: ``[B, 3, H, W]`` float, already normalised, each image in the top-left corner.
    mask: ``[B, H, W]`` bool, ``True`` on padding.
    sizes: ``[B, 2]`` int64 ``(h, w)`` of each image inside the padded batch.
    orig_sizes: ``[B, 2]`` int64 ``(h, w)`` of each image as read from disk (for post-processing).
    """

    images: Tensor
    mask: Tensor
    sizes: Tensor
    orig_sizes: Tensor

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(
            self.images.to(device, non_blocking=True),
            self.mask.to(device, non_blocking=True),
            self.sizes.to(device),
            self.orig_sizes.to(device),
        )

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Target:
    """Ground truth of one image, in the frame of the (transformed, unpadded) image.

    boxes: ``[N, 4]`` float normalised cxcywh. labels: ``[N]`` int64 contiguous class indices.
    image_id: the dataset's image id. size / orig_size: ``(h, w)`` after / before transforms.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = -1
    size: tuple[int, int] = (0, 0)
    orig_size: tuple[int, int] = (0, 0)

    def to(self, device: torch.device | str) -> Target:
        return Target(
            self.boxes.to(device), self.labels.to(device), self.image_id, self.size, self.orig_size
        )

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class LayerOutput:
    """Predictions of one decoder layer (or of the encoder proposals).

    logits: ``[B, Q, C]`` (softmax models: ``C = num_classes + 1``, last = "no object";
    sigmoid models: ``C = num_classes``). boxes: ``[B, Q, 4]`` normalised cxcywh in ``[0, 1]``.
    """

    logits: Tensor
    boxes: Tensor


@dataclass
class ProposalOutput(LayerOutput):
    """Encoder proposals (two-stage: every encoder token ``N = S``; mixed query selection: the
    ``N = Q`` selected ones). logits ``[B, N, C]``; boxes ``[B, N, 4]`` normalised cxcywh after
    the box head; anchors ``[B, N, 4]`` the proposals' anchor boxes before it (exactly 1.0 on
    invalid tokens)."""

    anchors: Tensor | None = None


@dataclass
class DenoisingMeta:
    """Where every denoising query came from; what the denoising loss needs.

    Entries are the *positive* noised copies, ``N = G * sum_b T_b``, ordered group by group,
    then image by image, then target by target (the official order).

    kind: ``dn`` or ``cdn``. pad_size: ``P``. num_groups: ``G``.
    group_size: slots per group, ``m`` (dn) or ``2m`` (cdn); 0 when the batch has no targets.
    batch_index / slot_index: ``[N]`` int64, image and slot of each entry.
    target_index: ``[N]`` int64, index of the entry's target within its image.
    labels / boxes: ``[N]`` int64 / ``[N, 4]`` the clean labels and normalised cxcywh boxes.
    num_targets: ``T_b`` per image.
    """

    kind: Literal["dn", "cdn"]
    pad_size: int
    num_groups: int
    group_size: int
    batch_index: Tensor
    slot_index: Tensor
    target_index: Tensor
    labels: Tensor
    boxes: Tensor
    num_targets: list[int]

    @property
    def num_entries(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DenoisingOutput:
    """Outputs of the denoising queries (training only) and what is needed to supervise them.

    layers: one :class:`LayerOutput` per decoder layer (last = final layer), ``[B, pad, C]``.
    meta: the :class:`DenoisingMeta` of the groups (where each
    denoising query came from, the clean labels and boxes it must reconstruct).
    """

    layers: list[LayerOutput]
    meta: DenoisingMeta


@dataclass
class DetectorOutput:
    """What :class:`detrkit.models.DetectionModel` returns.

    logits / boxes: the last decoder layer (see :class:`LayerOutput` for shapes).
    aux: one :class:`LayerOutput` per earlier decoder layer, first layer first.
    enc: the encoder proposals (two-stage / mixed query selection), when the model has them.
    dn: denoising outputs, in training with denoising only.
    """

    logits: Tensor
    boxes: Tensor
    aux: list[LayerOutput] = field(default_factory=list)
    enc: ProposalOutput | None = None
    dn: DenoisingOutput | None = None

    @property
    def final(self) -> LayerOutput:
        return LayerOutput(self.logits, self.boxes)


@dataclass
class Detections:
    """Post-processed detections of one image.

    boxes_xyxy: ``[K, 4]`` absolute pixels in the target size. scores: ``[K]``.
    labels: ``[K]`` contiguous class indices. query_index: ``[K]`` the query each came from.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    query_index: Tensor

    def __len__(self) -> int:
        return self.scores.shape[0]

    def filter(self, threshold: float) -> Detections:
        keep = self.scores >= threshold
        return Detections(
            self.boxes_xyxy[keep], self.scores[keep], self.labels[keep], self.query_index[keep]
        )


@dataclass
class LabelMap:
    """Contiguous class index -> dataset category id -> name.

    ``category_ids[i]`` and ``names[i]`` describe class index ``i``.
    """

    category_ids: list[int]
    names: list[str]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError("LabelMap: category_ids and names differ in length")

    def __len__(self) -> int:
        return len(self.category_ids)

    def name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else f"class_{index}"

    def to_json(self) -> dict:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        return cls([int(i) for i in data["category_ids"]], [str(n) for n in data["names"]])

    @classmethod
    def default(cls, num_classes: int) -> LabelMap:
        return cls(list(range(num_classes)), [f"class_{i}" for i in range(num_classes)])


@dataclass
class Prediction:
    """The detections of one image, in the pixels of that image as it was given.

    boxes_xyxy: ``[K, 4]`` float, absolute ``(x0, y0, x1, y1)``. scores: ``[K]``. labels:
    ``[K]`` int64 contiguous class indices. names / category_ids: per detection, from the
    label map. image_size: ``(h, w)`` of the image.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    category_ids: list[int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results entries: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
        (absolute pixels), ``score``."""
        out = []
        for box, score, cat in zip(
            self.boxes_xyxy.tolist(), self.scores.tolist(), self.category_ids
        ):
            x0, y0, x1, y1 = box
            out.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "score": round(float(score), 5),
                }
            )
        return out

    def to_supervision(self) -> supervision.Detections:
        """The detections as a ``supervision.Detections`` (extra ``supervision``), for its
        annotators and trackers: ``xyxy`` ``[K, 4]`` absolute pixels, ``confidence`` ``[K]``,
        ``class_id`` ``[K]`` (the contiguous class indices), ``data["class_name"]`` (the names
        its label annotator shows) and ``data["category_id"]`` (the dataset's ids), as numpy
        copies with the tensors' dtypes. Raises ImportError naming the extra without it."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError(
                "Prediction.to_supervision needs the supervision package: "
                'pip install "detrkit[supervision]"'
            ) from None
        import numpy as np

        def array(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().copy()

        return sv.Detections(
            xyxy=array(self.boxes_xyxy).reshape(-1, 4),
            confidence=array(self.scores),
            class_id=array(self.labels),
            data={
                "class_name": np.array(self.names, dtype=str),
                "category_id": np.array(self.category_ids, dtype=np.int64),
            },
        )
