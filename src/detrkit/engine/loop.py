"""The two loops everything else is built on: one training epoch and one evaluation pass.

Both take already-built pieces (model, criterion, post-processor, loader, evaluator) and a
device; neither reads the config tree. Mixed precision (``amp``, :mod:`detrkit.engine.precision`)
covers the model forward only: the criterion and the post-processor compute in float32.

One optimiser step of :func:`train_one_epoch` may span several batches (``accumulate``): each
batch's loss is divided by the number of batches of its step, the gradients add up, and only
the last batch of a step synchronises them across processes (DDP ``no_sync`` before). A step
whose loss or gradients are not finite is skipped (:mod:`detrkit.engine.steps`, :mod:`~.guard`).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from detrkit.engine.guard import NonFiniteGuard
from detrkit.engine.precision import AmpMode, autocast, to_float32
from detrkit.engine.steps import Epoch, EpochPosition, StepHooks, Updater, forward_loss
from detrkit.structures import Detections, ImageBatch, Target

__all__ = [
    "AmpMode",
    "autocast",
    "to_float32",
    "EpochPosition",
    "StepHooks",
    "train_one_epoch",
    "evaluate",
]

Batch = tuple[ImageBatch, list[Target]]


def _show_progress(progress: bool) -> bool:
    return progress and sys.stderr.isatty()


def _num_steps(loader: Iterable, max_steps: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_steps
    return n if max_steps is None else min(n, max_steps)


def _progress_bar(total: int | None, desc: str, progress: bool, initial: int = 0) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=False,
        disable=not _show_progress(progress),
        dynamic_ncols=True,
    )


def _epoch_end(
    loader: Iterable, position: EpochPosition, accumulate: int, max_steps: int | None
) -> int | None:
    """The batch index (within the epoch) where it ends; None for a loader without length."""
    remaining = _num_steps(loader, None)
    end = None if remaining is None else position.batches + remaining
    if max_steps is not None:
        end = max_steps * accumulate if end is None else min(end, max_steps * accumulate)
    return end


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    clip_max_norm: float = 0.0,
    amp: AmpMode = "none",
    scaler: torch.amp.GradScaler | None = None,
    accumulate: int = 1,
    max_steps: int | None = None,
    guard: NonFiniteGuard | None = None,
    hooks: StepHooks | None = None,
    start: EpochPosition | None = None,
    progress: bool = True,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader`` (at most ``max_steps`` optimiser steps).

    loader: yields ``(ImageBatch, list[Target])``; images ``[B,3,H,W]`` normalised, mask
    ``[B,H,W]`` True on padding, target boxes normalised cxcywh. Each optimiser step takes
    ``accumulate`` batches: forward (under autocast for ``amp``), criterion in float32,
    backward of ``loss / accumulate``; then gradient clipping to ``clip_max_norm`` (total L2
    norm; 0 disables) and the update. ``fp16`` needs ``scaler``. A step with a non-finite loss
    or gradient is skipped and reported to ``guard`` (default: stop at the first one).
    start: resume inside the epoch (the loader then yields only the remaining batches).
    ``log_fn(step, values)`` is called after every taken step (1-based within the epoch).

    Returns the means over taken steps of ``loss`` (weighted total), of every criterion
    term and of ``grad_norm`` (before clipping), plus ``steps`` (taken), ``skipped``,
    ``images_per_s`` and ``data_time_s`` (loader wait per batch).
    """
    if amp == "fp16" and scaler is None:
        raise ValueError("train_one_epoch: amp='fp16' needs a GradScaler (scaler=...)")
    if accumulate < 1:
        raise ValueError(f"train_one_epoch: accumulate must be >= 1, got {accumulate}")
    autocast(device, amp)  # an unusable amp mode fails before the first batch
    model.train()
    criterion.train()
    optimizer.zero_grad(set_to_none=True)
    position = start or EpochPosition()
    end = _epoch_end(loader, position, accumulate, max_steps)
    total = None if end is None else math.ceil(end / accumulate)
    bar = _progress_bar(total, f"epoch {epoch}", progress, initial=position.steps)
    updater = Updater(optimizer, clip_max_norm, scaler, hooks or StepHooks())
    guard = guard or NonFiniteGuard(1)
    run = Epoch(updater, guard, position, accumulate, end, bar, epoch, log_fn)
    run.consume(loader, partial(forward_loss, model, criterion, device, amp=amp), model)
    bar.close()
    if position.steps == 0:
        raise ValueError("train_one_epoch: the loader yielded no batch (is the dataset empty?)")
    return run.means()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: Callable[..., list[Detections]],
    loader: Iterable[Batch],
    evaluator: Any,
    device: torch.device,
    *,
    amp: AmpMode = "none",
    criterion: nn.Module | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    gather: Callable[[Any], list[Any] | None] | None = None,
) -> dict[str, float]:
    """Run ``model`` over ``loader`` and score the detections with ``evaluator``.

    The post-processor receives ``batch.orig_sizes`` (``[B,2]`` as ``(h, w)``), so detection
    boxes are absolute xyxy pixels of the original images, the frame of the COCO annotations.
    ``evaluator`` is a :class:`detrkit.engine.evaluation.CocoEvaluator` (``update(image_ids,
    detections)`` then ``summarize() -> dict``). With ``criterion`` the mean validation
    losses are added under the criterion's names (``loss`` = the weighted total).

    ``gather`` (a multi-process run, each process with its shard of the validation set, e.g.
    :func:`~detrkit.engine.distributed.gather_to_main`) takes this process's
    ``(evaluator.state(), loss sums, batches)`` and returns every process's on the one that
    scores, None on the others, which then return ``{}``.

    Returns the evaluator's metrics (``AP``, ``AP50``, ...), ``images`` (how many were
    scored) and the losses when computed.
    """
    model.eval()
    if criterion is not None:
        criterion.eval()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    bar = _progress_bar(_num_steps(loader, max_steps), "eval", progress)
    for batch, targets in loader:
        if max_steps is not None and steps >= max_steps:
            break
        _score_batch(model, postprocessor, evaluator, criterion, batch, targets, device, amp, sums)
        steps += 1
        bar.update()
    bar.close()
    if gather is not None:
        merged = _merge_shards(evaluator, dict(sums), steps, gather)
        if merged is None:
            return {}
        sums, steps = merged
    metrics = {key: float(value) for key, value in evaluator.summarize().items()}
    metrics["images"] = float(len(set(evaluator.evaluated_ids)))
    if criterion is not None and steps:
        metrics.update({key: value / steps for key, value in sums.items()})
    return metrics


def _score_batch(
    model: nn.Module,
    postprocessor: Callable[..., list[Detections]],
    evaluator: Any,
    criterion: nn.Module | None,
    batch: Batch,
    targets: list[Any],
    device: torch.device,
    amp: AmpMode,
    sums: dict[str, float],
) -> None:
    """Forward one validation batch, add its losses to ``sums`` and its detections to ``evaluator``."""
    batch = batch.to(device)
    with autocast(device, amp):
        outputs = model(batch.images, batch.mask)
    outputs = to_float32(outputs)
    if criterion is not None:
        losses = criterion(outputs, [t.to(device) for t in targets])
        sums["loss"] += losses.total.item()
        for key, value in losses.terms.items():
            sums[key] += float(value)
    detections = postprocessor(outputs, batch.orig_sizes)
    detections = [
        Detections(d.boxes_xyxy.cpu(), d.scores.cpu(), d.labels.cpu(), d.query_index.cpu())
        for d in detections
    ]
    evaluator.update([t.image_id for t in targets], detections)


def _merge_shards(
    evaluator: Any,
    sums: dict[str, float],
    steps: int,
    gather: Callable[[Any], list[Any] | None],
) -> tuple[dict[str, float], int] | None:
    """Pool every process's evaluator state, loss sums and batch count on the scoring one.

    Returns the pooled ``(sums, steps)`` there (``evaluator`` now holds every shard's
    detections) and None on the other processes.
    """
    parts = gather((evaluator.state(), sums, steps))
    if parts is None:
        return None
    evaluator.merge([state for state, _, _ in parts])
    pooled: dict[str, float] = defaultdict(float)
    for _, part, _ in parts:
        for key, value in part.items():
            pooled[key] += value
    return dict(pooled), sum(count for _, _, count in parts)
