"""The parts of one optimiser step of :func:`detrkit.engine.loop.train_one_epoch`.

A step spans ``accumulate`` batches (:class:`Step`): each batch's loss is divided by the
number of batches of its step and back-propagated, the values are averaged; only the last
batch synchronises the gradients across processes. :class:`Updater` then clips and applies
them, or skips a step whose loss or gradients are not finite (:mod:`detrkit.engine.guard`);
:class:`Epoch` keeps the position, the running sums, the progress bar and the hooks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detrkit.engine.distributed import all_agree, mean_over_processes
from detrkit.engine.guard import NonFiniteGuard, non_finite_terms
from detrkit.engine.precision import AmpMode, autocast, to_float32
from detrkit.structures import ImageBatch, Target

__all__ = ["EpochPosition", "StepHooks", "Step", "Updater", "Epoch", "forward_loss"]


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


def forward_loss(
    model: nn.Module,
    criterion: nn.Module,
    device: torch.device,
    batch: ImageBatch,
    targets: list[Target],
    *,
    amp: AmpMode,
) -> tuple[Any, str | None]:
    """The criterion's losses of one batch (forward under autocast, criterion in float32),
    or ``(None, why)`` when the model's outputs or a loss term are not finite (a corrupt
    image, an overflow; the matching cannot use NaN boxes) on this or another process."""
    batch = batch.to(device)
    targets = [t.to(device) for t in targets]
    # every process reaches both collectives (box count, agreement) whatever its batch holds
    num_boxes = mean_over_processes(float(sum(len(t.labels) for t in targets)), device)
    with autocast(device, amp):
        outputs = model(batch.images, batch.mask, targets)
    outputs = to_float32(outputs)
    losses, reason = None, _non_finite_outputs(outputs)
    if reason is None:
        losses = criterion(outputs, targets, num_boxes)
        reason = non_finite_terms(losses.total, losses.terms)
    if not all_agree(reason is None, device):
        return None, reason or "non-finite loss on another process"
    return losses, None


def _non_finite_outputs(outputs: Any) -> str | None:
    layers = [("final", outputs.logits, outputs.boxes)]
    layers += [(f"layer {i}", aux.logits, aux.boxes) for i, aux in enumerate(outputs.aux)]
    for name, logits, boxes in layers:
        for kind, value in (("logits", logits), ("boxes", boxes)):
            if not bool(torch.isfinite(value.detach()).all()):
                return f"the model's {kind} ({name}) are not finite"
    return None


class Step:
    """The batches of one optimiser step: their losses summed (scaled by ``1 / size``)
    into the gradients, their values averaged; ``bad`` says why the step must be skipped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: dict[str, float] = defaultdict(float)
        self.bad: str | None = None

    def add(self, result: tuple[Any, str | None], scaler: torch.amp.GradScaler | None) -> None:
        losses, reason = result
        if reason is not None:
            self.bad = reason
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


class Meter:
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


class Updater:
    """Applies (or skips) an accumulated step: schedule hook, clipping, optimiser update."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_max_norm: float,
        scaler: torch.amp.GradScaler | None,
        hooks: StepHooks,
    ) -> None:
        self.optimizer, self.clip_max_norm, self.scaler, self.hooks = (
            optimizer,
            clip_max_norm,
            scaler,
            hooks,
        )
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def finish(self, current: Step, step: int) -> bool:
        """Apply the step (run step ``step``) unless it is bad; returns whether it was taken."""
        if current.bad is None:
            if self.hooks.before is not None:
                self.hooks.before(step)
            grad_norm, current.bad = _update(
                self.optimizer, self.params, self.clip_max_norm, self.scaler
            )
            if math.isfinite(grad_norm):  # not after an fp16 overflow the scaler absorbed
                current.values["grad_norm"] = grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        return current.bad is None


class Epoch:
    """The bookkeeping of one epoch: which step a batch belongs to, the running sums, the
    progress bar, the guard and the hooks."""

    def __init__(
        self,
        updater: Updater,
        guard: NonFiniteGuard,
        position: EpochPosition,
        accumulate: int,
        end: int | None,
        bar: tqdm,
        epoch: int,
        log_fn: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        self.updater, self.guard, self.position = updater, guard, position
        self.accumulate, self.end, self.bar, self.epoch, self.log_fn = (
            accumulate,
            end,
            bar,
            epoch,
            log_fn,
        )
        self.sums: dict[str, float] = defaultdict(float, position.sums)
        self.meter = Meter()
        self.current: Step | None = None
        self.skipped = 0

    def consume(
        self,
        loader: Iterable[tuple[ImageBatch, list[Target]]],
        forward: Callable[[ImageBatch, list[Target]], tuple[Any, str | None]],
        model: nn.Module,
    ) -> None:
        """Every batch of ``loader`` up to the epoch's end, timing the loader's waits."""
        tick = time.perf_counter()
        for batch, targets in loader:
            if self.end is not None and self.position.batches >= self.end:
                break
            arrived = time.perf_counter()
            self.meter.data_s += arrived - tick
            self.feed(partial(forward, batch, targets), model)
            self.meter.images += len(targets)
            tick = time.perf_counter()
            self.meter.compute_s += tick - arrived

    def feed(self, losses: Callable[[], tuple[Any, str | None]], model: nn.Module) -> None:
        """One batch: its forward and backward (``losses`` computes them), then the update
        when it is the last batch of its step."""
        pos = self.position
        index = pos.batches % self.accumulate
        if index == 0:
            left = None if self.end is None else self.end - pos.batches
            self.current = Step(self.accumulate if left is None else min(self.accumulate, left))
        current = self.current
        assert current is not None
        last = index + 1 == current.size
        sync = contextlib.nullcontext()
        if not last and hasattr(model, "no_sync"):
            sync = model.no_sync()  # DDP: reduce the gradients once, with the last batch
        if current.bad is None:  # a bad step's remaining batches are not computed
            with sync:
                current.add(losses(), self.updater.scaler)
        pos.batches += 1
        self.meter.batches += 1
        if last:
            self._close(current)

    def _close(self, current: Step) -> None:
        pos = self.position
        taken = self.updater.finish(current, pos.step)
        if taken:
            self.guard.good()
            for key, value in current.values.items():
                self.sums[key] += value
            self.sums["steps"] += 1
            if self.log_fn is not None:
                self.log_fn(pos.steps + 1, dict(current.values))
            self.bar.set_postfix(
                loss=f"{self.sums['loss'] / self.sums['steps']:.4f}",
                lr=f"{self.updater.optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{self.meter.values().get('images_per_s', 0.0):.1f}",
            )
        else:
            self.skipped += 1
        pos.steps += 1
        pos.step += 1
        pos.sums = dict(self.sums)
        self.bar.update()
        if self.updater.hooks.after is not None:
            self.updater.hooks.after(pos, taken)
        if not taken:
            assert current.bad is not None
            self.guard.bad(self.epoch, pos.steps - 1, current.bad)

    def means(self) -> dict[str, float]:
        taken = int(self.sums.get("steps", 0))
        means = {k: v / max(taken, 1) for k, v in self.sums.items() if k != "steps"}
        means.update(steps=float(taken), skipped=float(self.skipped), **self.meter.values())
        return means
