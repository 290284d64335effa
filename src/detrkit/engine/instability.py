"""Matching instability (DN-DETR): how much the Hungarian assignment moves between epochs.

DN-DETR (Li et al., 2022) blames part of DETR's slow convergence on the bipartite matching:
the same query is matched to different objects from one epoch to the next, so its training
target keeps changing. With ``train.log_matching_instability: N`` (null, the default: off)
the trainer measures it on a fixed set of images after every epoch.

What is measured, exactly:

* the images: the first ``N`` of the training set (all of them when it has fewer), read with
  the validation transform (no flip, one scale, no crop), so that their targets are the same
  every epoch;
* the assignment: the training model (the raw weights, not the EMA) predicts them in eval mode
  without gradients; the criterion's matcher (the same costs) assigns the final decoder
  layer's queries to the ground truth. For object ``j`` of image ``b``, ``g_e(b, j)`` is the
  query matched to it after epoch ``e`` (-1 when the image has more objects than queries and
  it is left unmatched);
* ``changed`` = ``#{(b, j) : g_e(b, j) != g_{e-1}(b, j)}``, the objects whose matched query
  changed, and ``fraction`` = ``changed / objects`` in [0, 1];
* ``queries_changed``: DN-DETR's own count, over the queries: with ``V_e(b, q)`` the object
  matched to query ``q`` (-1: none), ``#{(b, q) : V_e(b, q) != V_{e-1}(b, q)}``. Two objects
  swapping queries count 2 in both; an object moving to a query that was unmatched counts 1
  in ``changed`` and 2 here, so ``changed <= queries_changed <= 2 * changed``.

Each epoch's ``metrics.jsonl`` row gets ``"matching_instability": {"images", "objects",
"changed", "queries_changed", "fraction"}``. The baseline is measured when training starts:
epoch 1 compares with the initial weights ("epoch 0"), and a run resumed at an epoch's end
first matches with the stored weights, so its values continue as in an uninterrupted run.
A run resumed from inside an epoch has no baseline: that epoch's ``changed``,
``queries_changed`` and ``fraction`` are null. Only the main process measures, with the
unwrapped model (no collective is involved; the other processes wait at the next one).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from detrkit.engine.precision import AmpMode, autocast, to_float32
from detrkit.structures import Target

if TYPE_CHECKING:
    from detrkit.config import Config
    from detrkit.criterion.matcher import HungarianMatcher, MatchIndices
    from detrkit.data.coco import CocoDetection

__all__ = [
    "INSTABILITY_KEY",
    "Assignment",
    "InstabilityStats",
    "MatchingInstability",
    "assignment_from_matches",
    "compare_assignments",
    "build_instability",
    "draw_instability",
]

INSTABILITY_KEY = "matching_instability"  # the metrics.jsonl section


@dataclass(frozen=True)
class Assignment:
    """The matching of one image: ``query_of_object[j]`` is the query matched to object ``j``
    (``[T]`` int64 on the CPU, -1: unmatched) among ``num_queries`` queries."""

    query_of_object: Tensor
    num_queries: int

    def object_of_query(self) -> Tensor:
        """``[num_queries]`` int64: the object matched to each query, -1 for none."""
        out = torch.full((self.num_queries,), -1, dtype=torch.int64)
        matched = self.query_of_object >= 0
        objects = torch.arange(len(self.query_of_object), dtype=torch.int64)
        out[self.query_of_object[matched]] = objects[matched]
        return out


@dataclass(frozen=True)
class InstabilityStats:
    """One epoch's measure (see the module docstring); ``changed`` and ``queries_changed``
    are None when there was no previous assignment to compare with."""

    images: int
    objects: int
    changed: int | None = None
    queries_changed: int | None = None

    @property
    def fraction(self) -> float | None:
        """``changed / objects`` in [0, 1]; None without a comparison or without objects."""
        if self.changed is None or self.objects == 0:
            return None
        return self.changed / self.objects

    def to_json(self) -> dict[str, float | int | None]:
        """The ``matching_instability`` section of a ``metrics.jsonl`` row."""
        return {
            "images": self.images,
            "objects": self.objects,
            "changed": self.changed,
            "queries_changed": self.queries_changed,
            "fraction": self.fraction,
        }


def assignment_from_matches(
    matches: MatchIndices, num_objects: Sequence[int], num_queries: int
) -> list[Assignment]:
    """The matcher's ``(query_idx, target_idx)`` per image as one :class:`Assignment` each;
    ``num_objects[b]`` is image ``b``'s number of targets."""
    out = []
    for (queries, targets), count in zip(matches, num_objects):
        query_of_object = torch.full((count,), -1, dtype=torch.int64)
        query_of_object[targets.long()] = queries.long()
        out.append(Assignment(query_of_object, num_queries))
    return out


def compare_assignments(
    previous: Sequence[Assignment], current: Sequence[Assignment]
) -> InstabilityStats:
    """The instability between two epochs' assignments of the same images (same objects)."""
    if len(previous) != len(current):
        raise ValueError(
            f"compare_assignments: {len(previous)} images before, {len(current)} now; "
            "the fixed images must be the same every epoch"
        )
    objects = changed = queries_changed = 0
    for b, (old, new) in enumerate(zip(previous, current)):
        if old.query_of_object.shape != new.query_of_object.shape:
            raise ValueError(
                f"compare_assignments: image {b} has {len(old.query_of_object)} objects "
                f"before and {len(new.query_of_object)} now; its targets must not change"
            )
        objects += len(new.query_of_object)
        changed += int((old.query_of_object != new.query_of_object).sum())
        queries_changed += int((old.object_of_query() != new.object_of_query()).sum())
    return InstabilityStats(len(current), objects, changed, queries_changed)


class MatchingInstability:
    """Follows the assignment of fixed images from epoch to epoch.

    dataset: the fixed images, ``dataset[i] -> (image [3, H, W] normalised, Target)`` with
    target boxes normalised cxcywh, the same at every call. matcher: the criterion's
    :class:`~detrkit.criterion.matcher.HungarianMatcher`. batch_size: images per forward;
    amp: the forward's precision (the matching is in float32).
    """

    def __init__(
        self,
        dataset: Dataset,
        matcher: HungarianMatcher,
        *,
        batch_size: int,
        amp: AmpMode = "none",
    ) -> None:
        self.dataset, self.matcher = dataset, matcher
        self.batch_size, self.amp = max(1, batch_size), amp
        self.previous: list[Assignment] | None = None

    @torch.no_grad()
    def assign(self, model: nn.Module, device: torch.device) -> list[Assignment]:
        """The current assignment of every fixed image (``model`` in eval mode meanwhile; its
        mode and torch's CPU random state are restored)."""
        from detrkit.data.collate import collate

        was_training = model.training
        model.eval()
        out: list[Assignment] = []
        try:
            with torch.random.fork_rng(devices=[]):
                n = len(self.dataset)  # type: ignore[arg-type]
                for start in range(0, n, self.batch_size):
                    items = [self.dataset[i] for i in range(start, min(n, start + self.batch_size))]
                    batch, targets = collate(items)
                    out += self._assign_batch(model, batch.to(device), targets)
        finally:
            model.train(was_training)
        return out

    def _assign_batch(
        self, model: nn.Module, batch: Any, targets: list[Target]
    ) -> list[Assignment]:
        with autocast(batch.images.device, self.amp):
            outputs = model(batch.images, batch.mask)
        outputs = to_float32(outputs)
        matches = self.matcher(outputs.logits, outputs.boxes, targets)
        sizes = [len(t) for t in targets]
        return assignment_from_matches(matches, sizes, int(outputs.logits.shape[1]))

    def update(self, model: nn.Module, device: torch.device) -> InstabilityStats:
        """Assign the fixed images with ``model``, compare with the previous call's assignment
        (None values at the first call) and keep this one for the next call."""
        current = self.assign(model, device)
        if self.previous is None:
            stats = InstabilityStats(len(current), sum(len(a.query_of_object) for a in current))
        else:
            stats = compare_assignments(self.previous, current)
        self.previous = current
        return stats

    def record(self, model: nn.Module, device: torch.device) -> dict[str, dict]:
        """:meth:`update` as the ``{"matching_instability": {...}}`` entry of a row."""
        return {INSTABILITY_KEY: self.update(model, device).to_json()}


def build_instability(
    cfg: Config, train_dataset: CocoDetection, matcher: HungarianMatcher
) -> MatchingInstability | None:
    """The tracker of ``train.log_matching_instability`` (None when it is null): the first
    ``N`` training images under the validation transform, matched by ``matcher``."""
    count = cfg.train.log_matching_instability
    if count is None:
        return None
    from torch.utils.data import Subset

    from detrkit.data.transforms import build_transforms

    fixed = copy.copy(train_dataset)  # the same records, read without augmentation
    fixed.transforms = build_transforms(cfg.data.augment, cfg.data.mean, cfg.data.std, False)
    subset = Subset(fixed, range(min(count, len(train_dataset))))
    return MatchingInstability(subset, matcher, batch_size=cfg.train.batch_size, amp=cfg.train.amp)


def _value(section: dict, key: str) -> float | None:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def draw_instability(axes: Sequence[Any], epochs: Sequence[float], sections: list[dict]) -> None:
    """Two matplotlib panels of the ``matching_instability`` sections of a run's rows (one
    per epoch, ``{}`` where absent): the fraction of objects whose query changed, and the
    counts (``changed`` objects, DN-DETR's ``queries_changed``) against ``objects``."""
    ax_fraction, ax_counts = axes
    points = {key: [] for key in ("fraction", "changed", "queries_changed", "objects")}
    for epoch, section in zip(epochs, sections):
        for key, series in points.items():
            value = _value(section, key)
            if value is not None:
                series.append((epoch, value))
    for ax, keys, title in (
        (ax_fraction, ("fraction",), "matching instability (fraction of objects)"),
        (ax_counts, ("changed", "queries_changed", "objects"), "matching instability (counts)"),
    ):
        ax.set_title(title)
        if not points["fraction"] and not points["changed"]:
            ax.text(0.5, 0.5, "no comparison yet", ha="center", va="center", transform=ax.transAxes)
            continue
        for key in keys:
            if points[key]:
                xs, ys = zip(*points[key])
                style = "--" if key == "objects" else "-"
                ax.plot(xs, ys, style, marker="o", markersize=3, label=key)
        ax.legend(fontsize="small")
    ax_fraction.set_ylim(-0.02, 1.02)
