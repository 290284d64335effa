"""The two loops everything else is built on: one training epoch and one evaluation pass.

Both take already-built pieces (model, criterion, post-processor, loader, evaluator) and a
device; neither reads the config tree. Mixed precision (``amp``, :mod:`detrkit.engine.precision`)
covers the model forward only: the criterion and the post-processor compute in float32.

One optimiser step of :func:`train_one_epoch` may span several batches (``accumulate``): each
batch's loss is divided by the number of batches of its step, the gradients add up, and only
the last batch of a step synchronises them across processes (DDP ``no_sync`` before). A step
whose loss or gradients are not finite is skipped (:mod:`detrkit.engine.guard`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from detrkit.engine.guard import NonFiniteGuard, non_finite_terms
from detrkit.engine.precision import AmpMode, autocast, to_float32
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


def _progress_bar(loader: Iterable, max_steps: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=_num_steps(loader, max_steps),
        desc=desc,
        leave=False,
        disable=not _show_progress(progress),
        dynamic_ncols=True,
    )


@dataclass
class EpochPosition:
    """How far an epoch has come: ``batches`` consumed (a multiple of the accumulation, the
    loader starts after them), optimiser ``steps`` taken in this epoch (skipped ones
    included), ``step`` of the whole run, and the running ``sums`` of the logged values
    (``sums["steps"]``: the steps that were taken and logged)."""

    batches: int = 0
    steps: int = 0
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class StepHooks:
    """Called by :func:`train_one_epoch` around every optimiser step.

    before(step): just before the update, with the run's 0-based step (set the learning rate).
    after(position, taken): after it (``taken`` False for a skipped step), with the position
    after this step (update an EMA, write a mid-epoch checkpoint).
    """

    before: Callable[[int], None] | None = None
    after: Callable[[EpochPosition, bool], None] | None = None


def _agree(flag: bool) -> bool:
    """``flag`` on every process (logical and across ranks; the flag itself when not
    distributed): ranks must skip a step together or DDP waits for the one that did not."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def _forward_loss(
    model: nn.Module,
    criterion: nn.Module,
    device: torch.device,
    batch: ImageBatch,
    targets: list[Target],
    amp: AmpMode,
) -> tuple[Any, str | None]:
    """The criterion's losses of one batch (forward under autocast, criterion in float32),
    or ``(None, why)`` when the model's outputs are not finite (a corrupt image, an
    overflow): the matching cannot use NaN boxes."""
    batch = batch.to(device)
    targets = [t.to(device) for t in targets]
    with autocast(device, amp):
        outputs = model(batch.images, batch.mask, targets)
    outputs = to_float32(outputs)
    layers = [("final", outputs.logits, outputs.boxes)]
    layers += [(f"layer {i}", aux.logits, aux.boxes) for i, aux in enumerate(outputs.aux)]
    for name, logits, boxes in layers:
        for kind, value in (("logits", logits), ("boxes", boxes)):
            if not bool(torch.isfinite(value.detach()).all()):
                return None, f"the model's {kind} ({name}) are not finite"
    return criterion(outputs, targets), None


class _Step:
    """The batches of one optimiser step: their losses summed (scaled by ``1 / size``)
    into the gradients, their values averaged; ``bad`` says why the step must be skipped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: dict[str, float] = defaultdict(float)
        self.bad: str | None = None

    def add(self, result: tuple[Any, str | None], scaler: torch.amp.GradScaler | None) -> None:
        losses, reason = result
        if reason is None:
            reason = non_finite_terms(losses.total, losses.terms)
        if not _agree(reason is None):
            self.bad = reason or "non-finite loss on another process"
            return
        loss = losses.total / self.size
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.values["loss"] += float(losses.total.detach()) / self.size
        for key, value in losses.terms.items():
            self.values[key] += float(value.detach()) / self.size


def _update(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    clip_max_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> tuple[float, str | None]:
    """Clip and apply the accumulated gradients; returns the total gradient norm before
    clipping and, when the gradients are not finite, why the step was skipped."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when the gradients overflowed
        scaler.update()
        return grad_norm, None  # an fp16 overflow is the scaler's to absorb, not a bad step
    if not math.isfinite(grad_norm):
        return grad_norm, f"gradients: total norm {grad_norm}"
    optimizer.step()
    return grad_norm, None


class _Meter:
    """Images per second of compute and seconds per batch spent waiting for the loader."""

    def __init__(self) -> None:
        self.images = 0
        self.compute_s = 0.0
        self.data_s = 0.0
        self.batches = 0

    def values(self) -> dict[str, float]:
        if not self.batches:
            return {}
        return {
            "images_per_s": self.images / max(self.compute_s + self.data_s, 1e-9),
            "data_time_s": self.data_s / self.batches,
        }


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

    Returns the mean over taken steps of ``loss`` (the weighted total), of every term the
    criterion reports and of ``grad_norm`` (before clipping), plus ``steps`` (taken),
    ``skipped``, ``images_per_s`` and ``data_time_s`` (loader wait per batch).
    """
    if amp == "fp16" and scaler is None:
        raise ValueError("train_one_epoch: amp='fp16' needs a GradScaler (scaler=...)")
    if accumulate < 1:
        raise ValueError(f"train_one_epoch: accumulate must be >= 1, got {accumulate}")
    autocast(device, amp)  # an unusable amp mode fails before the first batch
    guard = guard or NonFiniteGuard(1)
    hooks = hooks or StepHooks()
    position = start or EpochPosition()
    sums: dict[str, float] = defaultdict(float, position.sums)
    model.train()
    criterion.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    remaining = _num_steps(loader, None)
    end = None if remaining is None else position.batches + remaining
    if max_steps is not None:
        end = min(end, max_steps * accumulate) if end is not None else max_steps * accumulate
    total_steps = None if end is None else math.ceil(end / accumulate)
    bar = tqdm(
        total=total_steps,
        initial=position.steps,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not _show_progress(progress),
        dynamic_ncols=True,
    )
    meter, current, skipped = _Meter(), None, 0
    tick = time.perf_counter()
    for batch, targets in loader:
        if end is not None and position.batches >= end:
            break
        arrived = time.perf_counter()
        meter.data_s += arrived - tick
        index = position.batches % accumulate
        if index == 0:
            size = accumulate if end is None else min(accumulate, end - position.batches)
            current = _Step(size)
        assert current is not None
        last = index + 1 == current.size
        sync = contextlib.nullcontext()
        if not last and hasattr(model, "no_sync"):
            sync = model.no_sync()  # DDP: reduce the gradients once, with the last batch
        if current.bad is None:
            with sync:
                current.add(_forward_loss(model, criterion, device, batch, targets, amp), scaler)
        position.batches += 1
        meter.batches += 1
        meter.images += len(targets)
        if last:
            taken = _finish_step(current, optimizer, params, clip_max_norm, scaler, hooks, position)
            if taken:
                guard.good()
                for key, value in current.values.items():
                    sums[key] += value
                sums["steps"] += 1
                if log_fn is not None:
                    log_fn(position.steps + 1, dict(current.values))
                bar.set_postfix(
                    loss=f"{sums['loss'] / sums['steps']:.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    img_s=f"{meter.values()['images_per_s']:.1f}",
                )
            else:
                skipped += 1
            position.steps += 1
            position.step += 1
            position.sums = dict(sums)
            bar.update()
            if hooks.after is not None:
                hooks.after(position, taken)
            if not taken:
                assert current.bad is not None
                guard.bad(epoch, position.steps - 1, current.bad)
        tick = time.perf_counter()
        meter.compute_s += tick - arrived
    bar.close()
    if position.steps == 0:
        raise ValueError("train_one_epoch: the loader yielded no batch (is the dataset empty?)")
    taken = int(sums.get("steps", 0))
    means = {key: value / max(taken, 1) for key, value in sums.items() if key != "steps"}
    means.update(steps=float(taken), skipped=float(skipped), **meter.values())
    return means


def _finish_step(
    current: _Step,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    clip_max_norm: float,
    scaler: torch.amp.GradScaler | None,
    hooks: StepHooks,
    position: EpochPosition,
) -> bool:
    """Apply (or skip) the accumulated step; returns whether the update was taken."""
    if current.bad is None:
        if hooks.before is not None:
            hooks.before(position.step)
        grad_norm, current.bad = _update(optimizer, params, clip_max_norm, scaler)
        if math.isfinite(grad_norm):  # not after an fp16 overflow the scaler absorbed
            current.values["grad_norm"] = grad_norm
    optimizer.zero_grad(set_to_none=True)
    return current.bad is None


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
) -> dict[str, float]:
    """Run ``model`` over ``loader`` and score the detections with ``evaluator``.

    The post-processor receives ``batch.orig_sizes`` (``[B,2]`` as ``(h, w)``), so detection
    boxes are absolute xyxy pixels of the original images, the frame of the COCO annotations.
    ``evaluator`` is a :class:`detrkit.engine.evaluation.CocoEvaluator` (``update(image_ids,
    detections)`` then ``summarize() -> dict``). With ``criterion`` the mean validation
    losses are added under the criterion's names (``loss`` = the weighted total).

    Returns the evaluator's metrics (``AP``, ``AP50``, ...) and the losses when computed.
    """
    model.eval()
    if criterion is not None:
        criterion.eval()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    bar = _progress_bar(loader, max_steps, "eval", progress)
    for batch, targets in loader:
        if max_steps is not None and steps >= max_steps:
            break
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
        steps += 1
        bar.update()
    bar.close()
    metrics = {key: float(value) for key, value in evaluator.summarize().items()}
    if criterion is not None and steps:
        metrics.update({key: value / steps for key, value in sums.items()})
    return metrics
