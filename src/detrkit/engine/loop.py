"""The two loops everything else is built on: one training epoch and one evaluation pass.

Both take already-built pieces (model, criterion, post-processor, loader, evaluator) and a
device; neither reads the config tree. Mixed precision (``amp``) covers the model forward
only: the criterion and the post-processor always compute in float32.

* ``"bf16"``: ``torch.autocast`` with bfloat16, on CUDA or CPU; no loss scaling needed.
* ``"fp16"``: ``torch.autocast`` with float16 and a ``torch.amp.GradScaler``; CUDA only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detrkit.config import ConfigError
from detrkit.structures import Detections, ImageBatch, Target

__all__ = ["AmpMode", "autocast", "to_float32", "train_one_epoch", "evaluate"]

AmpMode = Literal["none", "bf16", "fp16"]
Batch = tuple[ImageBatch, list[Target]]


def autocast(device: torch.device, amp: AmpMode) -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` on ``device`` (a no-op context for ``"none"``)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"train.amp: fp16 needs a CUDA device; use bf16 or none on {device.type}"
            )
        return torch.autocast("cuda", dtype=torch.float16)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.amp: '{amp}' is not one of ['none', 'bf16', 'fp16']")


def to_float32(value: Any) -> Any:
    """A copy of ``value`` (tensor, dataclass such as ``DetectorOutput``, list, tuple, dict)
    with every floating-point tensor in float32; other values are returned unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: to_float32(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value


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


def _check_finite(losses: Any, epoch: int, step: int) -> None:
    """Stop with a message naming every loss term when the total loss is not finite."""
    total = losses.total
    if not math.isfinite(total.item()):
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.terms.items())
        raise FloatingPointError(
            f"epoch {epoch}, step {step}: the loss is {total.item()} ({terms}); "
            "try a lower train.lr, a smaller train.clip_max_norm or train.amp=none"
        )


def _backward_and_step(
    total: Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    clip_max_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> Tensor:
    """Backward of ``total``, gradient clipping, optimiser step; returns the total gradient
    norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        total.backward()
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def _train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    device: torch.device,
    batch: ImageBatch,
    targets: list[Target],
    *,
    epoch: int,
    step: int,
    clip_max_norm: float,
    amp: AmpMode,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, float]:
    """One optimisation step on one batch (see :func:`train_one_epoch`); returns its values:
    ``loss``, ``grad_norm`` and every term of the criterion."""
    batch = batch.to(device)
    targets = [t.to(device) for t in targets]
    with autocast(device, amp):
        outputs = model(batch.images, batch.mask, targets)
    losses = criterion(to_float32(outputs), targets)
    _check_finite(losses, epoch, step)
    grad_norm = _backward_and_step(losses.total, optimizer, params, clip_max_norm, scaler)
    values = {"loss": losses.total.item(), "grad_norm": float(grad_norm)}
    values.update({k: float(v.detach()) for k, v in losses.terms.items()})
    return values


class _StepLog:
    """The values of an epoch's steps: summed per key, passed to ``log_fn(step, values)`` and
    shown as the running mean loss on the progress bar."""

    def __init__(self, bar: tqdm, log_fn: Callable[[int, dict[str, float]], None] | None) -> None:
        self.bar, self.log_fn = bar, log_fn
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0

    def log(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += value
        self.steps += 1
        if self.log_fn is not None:
            self.log_fn(self.steps, values)
        self.bar.set_postfix(loss=f"{self.sums['loss'] / self.steps:.4f}")
        self.bar.update()

    def means(self) -> dict[str, float]:
        """The mean of every key over the steps, plus ``steps``."""
        means = {key: total / self.steps for key, total in self.sums.items()}
        means["steps"] = float(self.steps)
        return means


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
    max_steps: int | None = None,
    progress: bool = True,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader`` (at most ``max_steps`` batches).

    loader: yields ``(ImageBatch, list[Target])``; images ``[B,3,H,W]`` normalised, mask
    ``[B,H,W]`` True on padding, target boxes normalised cxcywh. Each step: forward (under
    autocast for ``amp``), criterion in float32, backward, gradient clipping to
    ``clip_max_norm`` (total L2 norm; 0 disables), optimiser step. ``fp16`` needs ``scaler``.
    ``log_fn(step, values)`` is called after every step with that step's values.

    Returns the mean over steps of ``loss`` (the weighted total), of every term the criterion
    reports, and of ``grad_norm`` (before clipping), plus ``steps``.
    """
    if amp == "fp16" and scaler is None:
        raise ValueError("train_one_epoch: amp='fp16' needs a GradScaler (scaler=...)")
    model.train()
    criterion.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = _progress_bar(loader, max_steps, f"epoch {epoch}", progress)
    log = _StepLog(bar, log_fn)
    for batch, targets in loader:
        if max_steps is not None and log.steps >= max_steps:
            break
        values = _train_step(
            model,
            criterion,
            optimizer,
            params,
            device,
            batch,
            targets,
            epoch=epoch,
            step=log.steps,
            clip_max_norm=clip_max_norm,
            amp=amp,
            scaler=scaler,
        )
        log.log(values)
    bar.close()
    if log.steps == 0:
        raise ValueError("train_one_epoch: the loader yielded no batch (is the dataset empty?)")
    return log.means()


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
