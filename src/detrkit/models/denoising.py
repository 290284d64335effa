"""Denoising query groups (DN-DETR, DINO's contrastive denoising), as pure functions.

During training the decoder also receives noised copies of the ground truth ("denoising
queries"), prepended to the matching queries, and learns to reconstruct the clean boxes and
labels. Shapes: ``B`` images, ``T_b`` targets of image ``b``, ``m = max_b T_b``, ``G`` groups,
``P`` denoising slots per image, ``Q`` matching queries, ``d`` width.

Layout of the ``P`` slots (the same for every image; images with fewer targets leave the
remaining slots of each group as padding: zero content, zero box logits)::

    dn  (DN-DETR): G groups of m slots; slot g*m + j = target j of the image, noised.  P = G*m
    cdn (DINO):    G groups of 2m slots; slot g*2m + j = positive copy of target j,
                   slot g*2m + m + j = negative copy (pushed further away).            P = 2*G*m

Attention mask ``[P + Q, P + Q]`` (``True`` = may not attend): a denoising slot sees only the
slots of its own group and the matching queries; a matching query sees no denoising slot
(otherwise it could copy the answer).

Boxes are normalised cxcywh; ``boxes_unact`` are boxes in inverse-sigmoid space. Targets are
:class:`~detrkit.structures.Target` (or anything with ``labels [T]`` and ``boxes [T, 4]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from detrkit.boxes import inverse_sigmoid
from detrkit.structures import DenoisingMeta

__all__ = [
    "DenoisingKind",
    "DenoisingGroups",
    "DenoisingQueries",
    "cdn_num_groups",
    "noise_labels",
    "noise_boxes_dn",
    "noise_boxes_cdn",
    "build_denoising_groups",
    "denoising_attention_mask",
    "embed_denoising_queries",
    "prepare_denoising",
    "split_denoising",
]

DenoisingKind = Literal["dn", "cdn"]


class _HasBoxes(Protocol):
    labels: Tensor
    boxes: Tensor


@dataclass
class DenoisingGroups:
    """Noised copies of the targets and where they go.

    labels / boxes: ``[M]`` int64 noised labels and ``[M, 4]`` noised normalised cxcywh boxes
    (clamped to ``[0, 1]``) of every copy (``M = N`` for dn, ``2N`` for cdn: positives and
    negatives interleaved group by group). batch_index / slot_index: ``[M]`` placement.
    meta: the :class:`DenoisingMeta` (positives only).
    """

    labels: Tensor
    boxes: Tensor
    batch_index: Tensor
    slot_index: Tensor
    meta: DenoisingMeta


@dataclass
class DenoisingQueries:
    """Denoising queries ready to be prepended to the matching queries (batch-first).

    content: ``[B, P, d]`` content queries. boxes_unact: ``[B, P, 4]`` anchor boxes in
    inverse-sigmoid space. attn_mask: ``[P + Q, P + Q]`` bool (``True`` = blocked), or ``None``
    when ``P == 0``. meta: :class:`DenoisingMeta`.
    """

    content: Tensor
    boxes_unact: Tensor
    attn_mask: Tensor | None
    meta: DenoisingMeta

    @property
    def pad_size(self) -> int:
        return self.meta.pad_size


def cdn_num_groups(dn_number: int, max_targets: int) -> int:
    """Number of contrastive groups of DINO for a query budget ``dn_number`` and the largest
    target count ``max_targets`` of the batch.

    The official rule: with ``n = 2 * dn_number``, ``n // (2 * max_targets)`` groups when
    ``n >= 100`` (the default budget 100 gives ``100 // max_targets``), else ``n`` groups;
    at least 1, and 1 when the batch has no targets.
    """
    n = 2 * dn_number
    if max_targets == 0:
        return 1
    if n >= 100:
        n = n // (2 * max_targets)
    return max(n, 1)


def _rand(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(tuple(shape), dtype=like.dtype, device=like.device, generator=generator)


def noise_labels(
    labels: Tensor, flip_prob: float, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label with probability ``flip_prob`` by a uniformly drawn class.

    labels: ``[M]`` int64. Returns a new ``[M]`` int64 tensor. Draws, in order, ``M`` uniforms
    and one class per flipped label (the official sequence of random calls).
    """
    out = labels.clone()
    if flip_prob <= 0:
        return out
    p = _rand(labels.shape, labels.float(), generator)  # [M]
    chosen = torch.nonzero(p < flip_prob).view(-1)  # [K]
    new = torch.randint(
        0, num_classes, chosen.shape, dtype=chosen.dtype, device=chosen.device, generator=generator
    )
    return out.scatter_(0, chosen, new)


def noise_boxes_dn(boxes: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """DN-DETR box noise: move the centre by up to ``scale * (w, h) / 2`` and change the size
    by up to ``scale * (w, h)``, uniformly; clamp to ``[0, 1]``.

    boxes: ``[M, 4]`` normalised cxcywh -> ``[M, 4]``.
    """
    if scale <= 0:
        return boxes.clone()
    diff = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)  # [M, 4]
    noise = _rand(boxes.shape, boxes, generator) * 2 - 1.0
    return (boxes + noise * diff * scale).clamp(min=0.0, max=1.0)


def noise_boxes_cdn(
    boxes: Tensor, scale: float, negative: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """DINO box noise on the corners: each corner moves by ``s * u * scale * (w, h) / 2`` with a
    random sign ``s`` and ``u ~ U[0, 1)`` for positives, ``U[1, 2)`` for negatives; corners are
    clamped to ``[0, 1]``.

    boxes: ``[M, 4]`` normalised cxcywh; negative: ``[M]`` bool. Returns ``[M, 4]`` cxcywh.
    """
    if scale <= 0:
        return boxes.clone()
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
    diff = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:] / 2], dim=1)  # [M, 4]
    sign = (
        torch.randint(
            0, 2, tuple(boxes.shape), dtype=boxes.dtype, device=boxes.device, generator=generator
        )
        * 2.0
        - 1.0
    )
    part = _rand(boxes.shape, boxes, generator)
    part = part + negative[:, None].to(part.dtype)
    xyxy = (xyxy + part * sign * diff * scale).clamp(min=0.0, max=1.0)
    return torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)


def _batch_targets(targets: Sequence[_HasBoxes], num_classes: int) -> tuple[Tensor, ...]:
    """All targets of a batch: labels ``[T]``, boxes ``[T, 4]``, the counts ``T_b``, and per
    target its image ``[T]`` and index within the image ``[T]``."""
    labels_b = [t.labels.reshape(-1).long() for t in targets]
    boxes_b = [t.boxes.reshape(-1, 4) for t in targets]
    device = boxes_b[0].device if boxes_b else torch.device("cpu")
    counts = [int(lab.shape[0]) for lab in labels_b]
    labels = torch.cat(labels_b).to(device) if labels_b else torch.zeros(0, dtype=torch.long)
    boxes = torch.cat(boxes_b).to(device).float() if boxes_b else torch.zeros(0, 4)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"denoising: target labels must lie in [0, {num_classes}), got "
            f"{sorted(set(labels.tolist()))}; check model.num_classes"
        )
    image = torch.cat(
        [torch.full((c,), b, dtype=torch.long) for b, c in enumerate(counts)]
        or [torch.zeros(0, dtype=torch.long)]
    ).to(device)
    within = torch.cat([torch.arange(c) for c in counts] or [torch.zeros(0, dtype=torch.long)]).to(
        device
    )
    return labels, boxes, counts, image, within


def build_denoising_groups(
    targets: Sequence[_HasBoxes],
    kind: DenoisingKind,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> DenoisingGroups:
    """Noised copies of the targets of a batch, grouped (see the module docstring).

    Args:
        targets: ``B`` targets with ``labels [T_b]`` (``0 <= label < num_classes``) and
            ``boxes [T_b, 4]`` normalised cxcywh; images may have no target.
        kind: ``dn`` (DN-DETR: ``dn_number`` groups, label flip probability
            ``label_noise_ratio``) or ``cdn`` (DINO: groups from :func:`cdn_num_groups`,
            flip probability ``label_noise_ratio / 2``, negatives).
        dn_number: groups (dn) or query budget (cdn).
        box_noise_scale: box jitter relative to the box size (0 = none).
        num_classes: labels are drawn from ``0 .. num_classes - 1``.
        generator: random generator (default: the global one of the targets' device; the
            random calls follow the official order, so a seeded global generator reproduces
            the official queries).
    """
    if kind not in ("dn", "cdn"):
        raise ValueError(f"denoising kind must be 'dn' or 'cdn', got {kind!r}")
    if dn_number < 1:
        raise ValueError(f"model.denoising.dn_number: must be >= 1, got {dn_number}")
    labels, boxes, counts, image, within = _batch_targets(targets, num_classes)
    max_t = max(counts, default=0)
    copies_per_group = 1 if kind == "dn" else 2
    groups = dn_number if kind == "dn" else cdn_num_groups(dn_number, max_t)
    reps = groups * copies_per_group
    copy = torch.arange(reps, device=labels.device).repeat_interleave(labels.shape[0])  # [M]
    batch_index, target_index = image.repeat(reps), within.repeat(reps)  # [M]
    slot_index = copy * max_t + target_index  # [M]
    clean_labels, clean_boxes = labels.repeat(reps), boxes.repeat(reps, 1)

    flip = label_noise_ratio if kind == "dn" else label_noise_ratio * 0.5
    noised_labels = noise_labels(clean_labels, flip, num_classes, generator)
    negative = (copy % 2 == 1) if kind == "cdn" else torch.zeros_like(copy, dtype=torch.bool)
    if kind == "dn":
        noised_boxes = noise_boxes_dn(clean_boxes, box_noise_scale, generator)
    else:
        noised_boxes = noise_boxes_cdn(clean_boxes, box_noise_scale, negative, generator)

    pos = ~negative
    meta = DenoisingMeta(
        kind=kind,
        pad_size=max_t * reps,
        num_groups=groups,
        group_size=max_t * copies_per_group,
        batch_index=batch_index[pos],
        slot_index=slot_index[pos],
        target_index=target_index[pos],
        labels=clean_labels[pos],
        boxes=clean_boxes[pos],
        num_targets=counts,
    )
    return DenoisingGroups(noised_labels, noised_boxes, batch_index, slot_index, meta)


def denoising_attention_mask(
    pad_size: int, group_size: int, num_queries: int, device: torch.device | str | None = None
) -> Tensor:
    """Self-attention mask of ``pad_size`` denoising slots (groups of ``group_size``) followed
    by ``num_queries`` matching queries: ``[P + Q, P + Q]`` bool, ``True`` = blocked."""
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    if pad_size == 0:
        return mask
    group = torch.arange(pad_size, device=device) // group_size  # [P]
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    mask[pad_size:, :pad_size] = True
    return mask


def embed_denoising_queries(
    groups: DenoisingGroups,
    label_embedding: torch.nn.Embedding,
    batch_size: int,
    indicator: bool,
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Content and box queries of the denoising slots.

    Args:
        groups: from :func:`build_denoising_groups`.
        label_embedding: class embedding (``num_classes + 1`` rows or more).
        batch_size: ``B``.
        indicator: append a 1 to each embedded label (DN-DETR: the embedding is ``d - 1``
            wide and the last channel marks denoising queries); padding slots get 0.
        eps: clamp of the inverse sigmoid of the noised boxes.

    Returns:
        content ``[B, P, d]`` and boxes_unact ``[B, P, 4]`` (zeros on padding slots).
    """
    pad = groups.meta.pad_size
    weight = label_embedding.weight
    width = weight.shape[1] + int(indicator)
    content = weight.new_zeros(batch_size, pad, width)
    boxes_unact = weight.new_zeros(batch_size, pad, 4)
    if groups.labels.numel():
        embed = label_embedding(groups.labels.to(weight.device))  # [M, d or d-1]
        if indicator:
            embed = torch.cat([embed, embed.new_ones(embed.shape[0], 1)], dim=1)
        b, s = groups.batch_index.to(weight.device), groups.slot_index.to(weight.device)
        content = content.index_put((b, s), embed)
        boxes_unact = boxes_unact.index_put((b, s), inverse_sigmoid(groups.boxes.to(weight), eps))
    return content, boxes_unact


def prepare_denoising(
    targets: Sequence[_HasBoxes],
    label_embedding: torch.nn.Embedding,
    num_queries: int,
    kind: DenoisingKind,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    indicator: bool,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> DenoisingQueries:
    """Everything a decoder needs for one training step: :func:`build_denoising_groups`,
    :func:`embed_denoising_queries` and :func:`denoising_attention_mask` for ``num_queries``
    matching queries. A batch without any target gives ``P = 0`` (no denoising queries)."""
    groups = build_denoising_groups(
        targets, kind, dn_number, label_noise_ratio, box_noise_scale, num_classes, generator
    )
    content, boxes_unact = embed_denoising_queries(
        groups, label_embedding, len(targets), indicator, eps
    )
    meta = groups.meta
    mask = (
        denoising_attention_mask(meta.pad_size, meta.group_size, num_queries, content.device)
        if meta.pad_size
        else None
    )
    return DenoisingQueries(content, boxes_unact, mask, meta)


def split_denoising(x: Tensor, pad_size: int, dim: int = -2) -> tuple[Tensor, Tensor]:
    """Split decoder outputs along the query dimension ``dim`` into the first ``pad_size``
    (denoising) and the rest (matching), e.g. ``[L, B, P + Q, C]`` ->
    ``[L, B, P, C], [L, B, Q, C]``."""
    return x.narrow(dim, 0, pad_size), x.narrow(dim, pad_size, x.shape[dim] - pad_size)
