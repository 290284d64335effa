"""Sliced inference: detect objects in one large image tile by tile, then merge.

    from detrkit import Detector
    from detrkit.inference.sliced import predict_sliced

    det = Detector.from_checkpoint("runs/trees/checkpoint_best")
    pred = predict_sliced(det, "orthomosaic.png", tile=400, overlap=0.2, merge="fusion")

The image is cut into the windows of :func:`detrkit.data.tiles.tile_windows` (the same ones
training tiles use); the detector runs on each tile (``batch_size`` tiles at a time), the
boxes are shifted back into image pixels and, optionally, the detections of a whole-image pass
are added. Overlapping tiles see the same object twice, so detections are merged class by
class: ``"nms"`` keeps the best-scoring box of each group (``torchvision.ops.batched_nms``),
``"fusion"`` (weighted box fusion) replaces each group by its score-weighted mean box.

Boxes are absolute xyxy pixels throughout. Boxes of objects cut by an interior tile edge are
not dropped: the neighbouring tile, which overlaps by ``overlap``, usually sees the whole
object, and the merge removes the duplicate when the two boxes overlap enough.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from detrkit.data.images import image_size_hw
from detrkit.data.tiles import tile_windows

if TYPE_CHECKING:  # the api layer sits above this one: typing only
    from detrkit.api import ImageInput, Prediction

__all__ = ["predict_sliced", "weighted_box_fusion"]

Merge = Literal["nms", "fusion"]


def weighted_box_fusion(
    boxes_xyxy: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse same-class boxes that overlap: ``boxes_xyxy [N, 4]`` (absolute xyxy), ``scores
    [N]``, ``labels [N]`` -> fused ``(boxes [M, 4], scores [M], labels [M])``, by score.

    Boxes are visited by decreasing score; a box joins the first cluster of its class whose
    current fused box it overlaps with IoU > ``iou_threshold``, else it starts a new cluster.
    A cluster's box is the score-weighted mean of its members' boxes; its score is the
    highest member score (an object seen by one tile only is not penalised)."""
    order = torch.argsort(scores, descending=True, stable=True)
    fused_boxes: list[Tensor] = []  # per cluster: the current fused box [4]
    sums: list[Tensor] = []  # per cluster: sum of score * box [4]
    weights: list[float] = []
    best: list[float] = []
    cluster_labels: list[int] = []
    by_label: dict[int, list[int]] = {}
    for i in order.tolist():
        box, score, label = boxes_xyxy[i].double(), float(scores[i]), int(labels[i])
        members = by_label.setdefault(label, [])
        target = -1
        if members:
            ious = box_iou(box[None], torch.stack([fused_boxes[c] for c in members]))[0]
            above = torch.nonzero(ious > iou_threshold)
            if len(above):
                target = members[int(above[0])]
        if target < 0:
            members.append(len(fused_boxes))
            fused_boxes.append(box)
            sums.append(box * score)
            weights.append(score)
            best.append(score)
            cluster_labels.append(label)
            continue
        sums[target] = sums[target] + box * score
        weights[target] += score
        best[target] = max(best[target], score)
        fused_boxes[target] = (
            sums[target] / weights[target] if weights[target] > 0 else fused_boxes[target]
        )
    if not fused_boxes:
        return boxes_xyxy.new_zeros((0, 4)), scores.new_zeros((0,)), labels.new_zeros((0,))
    out_boxes = torch.stack(fused_boxes).to(boxes_xyxy.dtype)
    out_scores = torch.tensor(best, dtype=scores.dtype)
    out_labels = torch.tensor(cluster_labels, dtype=labels.dtype)
    keep = torch.argsort(out_scores, descending=True, stable=True)
    return out_boxes[keep], out_scores[keep], out_labels[keep]


def _crop(image: Any, window: tuple[int, int, int, int]) -> Any:
    """``window`` (absolute xyxy) of a PIL image or a ``[3, H, W]`` tensor."""
    x0, y0, x1, y1 = window
    if isinstance(image, Tensor):
        return image[:, y0:y1, x0:x1]
    return image.crop(window)


def _check_args(tile: int, overlap: float, merge: str, batch_size: int) -> None:
    """One-line ``ValueError`` naming the bad argument of :func:`predict_sliced`."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: must be a positive integer (pixels), got {tile!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: must be in [0, 1), got {overlap!r}")
    if merge not in ("nms", "fusion"):
        raise ValueError(f"merge: expected 'nms' or 'fusion', got {merge!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")


def _gather(
    preds: list, offsets: list[tuple[int, int]], width: int, height: int
) -> tuple[Tensor, Tensor, Tensor, dict[int, str], dict[int, int]]:
    """All detections in image pixels: boxes ``[N, 4]`` absolute xyxy (shifted by each tile's
    origin, clipped to the image), scores ``[N]``, labels ``[N]``, and the name and category
    id of each label seen."""
    boxes, scores, labels = [torch.zeros((0, 4))], [torch.zeros((0,))], [torch.zeros((0,))]
    name_of: dict[int, str] = {}
    cat_of: dict[int, int] = {}
    for pred, (dx, dy) in zip(preds, offsets):
        shift = torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        boxes.append(pred.boxes_xyxy.float().reshape(-1, 4) + shift)
        scores.append(pred.scores.float().reshape(-1))
        labels.append(pred.labels.reshape(-1).float())
        for label, name, cat in zip(pred.labels.tolist(), pred.names, pred.category_ids):
            name_of[int(label)], cat_of[int(label)] = name, cat
    all_boxes = torch.cat(boxes)
    all_boxes[:, 0::2] = all_boxes[:, 0::2].clamp(0, width)
    all_boxes[:, 1::2] = all_boxes[:, 1::2].clamp(0, height)
    return all_boxes, torch.cat(scores), torch.cat(labels).long(), name_of, cat_of


def predict_sliced(
    detector: Any,
    image: ImageInput,
    tile: int,
    overlap: float = 0.2,
    *,
    merge: Merge = "nms",
    iou_threshold: float = 0.5,
    threshold: float = 0.3,
    batch_size: int = 4,
    full_image: bool = False,
) -> Prediction:
    """Detect objects in one (large) image tile by tile; one :class:`Prediction` in the
    image's pixels, like ``detector.predict(image)[0]``.

    detector: a :class:`~detrkit.Detector`, or any object with its ``read_image(image)`` (to
    a PIL image or ``[3, H, W]`` tensor) and ``predict(images, threshold, batch_size=...)``
    returning :class:`~detrkit.structures.Prediction` objects (boxes absolute xyxy in each image).
    image: a path, PIL image, ``HWC`` uint8 array or ``CHW`` tensor (see ``Detector.predict``).
    tile: tile side in pixels; overlap: fraction of the side shared by neighbouring tiles, in
    [0, 1). merge: ``"nms"`` or ``"fusion"`` (module docstring), applied with
    ``iou_threshold``. threshold: minimum score of a tile detection. full_image: also run the
    detector on the whole image and merge its detections with the tiles'.

    Returns boxes ``[K, 4]`` absolute xyxy clipped to the image, scores ``[K]`` (descending),
    labels ``[K]``, and names / category ids as the detector gives them."""
    _check_args(tile, overlap, merge, batch_size)
    picture = detector.read_image(image)
    height, width = image_size_hw(picture)
    windows = tile_windows(width, height, tile, overlap)
    crops = [_crop(picture, w) for w in windows]
    preds = list(detector.predict(crops, threshold=threshold, batch_size=batch_size))
    offsets = [(w[0], w[1]) for w in windows]
    if full_image and len(windows) > 1:  # with one window the tile is the whole image
        preds += list(detector.predict([picture], threshold=threshold, batch_size=1))
        offsets.append((0, 0))

    boxes, scores, labels, name_of, cat_of = _gather(preds, offsets, width, height)
    if merge == "nms":
        keep = batched_nms(boxes, scores, labels, iou_threshold)
        out_boxes, out_scores, out_labels = boxes[keep], scores[keep], labels[keep]
    else:
        out_boxes, out_scores, out_labels = weighted_box_fusion(
            boxes, scores, labels, iou_threshold
        )
    return dataclasses.replace(
        preds[0],
        boxes_xyxy=out_boxes,
        scores=out_scores,
        labels=out_labels,
        names=[name_of[i] for i in out_labels.tolist()],
        category_ids=[cat_of[i] for i in out_labels.tolist()],
        image_size=(height, width),
    )
