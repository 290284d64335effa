"""One optimiser step: gradient accumulation, the non-finite guard (a NaN injected into a loss
term and into an input image), and the schedule hook."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from detrkit.criterion.set_loss import build_criterion
from detrkit.data.build import build_datasets, build_loader
from detrkit.engine.guard import NonFiniteGuard, TrainingDiverged
from detrkit.engine.loop import StepHooks, train_one_epoch
from detrkit.models import build_model
from tests.conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("steps"))
    train_ds, _ = build_datasets(cfg.data)
    batches = list(build_loader(train_ds, 2, train=False, num_workers=0, seed=0))
    return cfg, batches


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg), build_criterion(cfg)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _gradient(model, criterion, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=False)
    images, targets = batch
    criterion(model(images.images, images.mask, targets), targets).total.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_accumulated_step_applies_the_mean_gradient_of_its_batches(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    start = _weights(model)
    # independently: the gradient of each batch on its own
    grads = [_gradient(model, criterion, b) for b in batches[:2]]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train_one_epoch(
        model, criterion, batches[:2], optimizer, CPU, epoch=1, accumulate=2, progress=False
    )
    assert stats["steps"] == 1  # two batches, one optimiser step
    for w0, w1, g1, g2 in zip(start, _weights(model), *grads, strict=True):
        torch.testing.assert_close(w1, w0 - (g1 + g2) / 2, rtol=1e-4, atol=1e-6)


def test_a_partial_last_step_is_scaled_by_its_own_size(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _weights(model)
    seen = []
    hooks = StepHooks(after=lambda position, taken: seen.append(_weights(model)))
    # three batches with accumulate=2: a step of two, then a step of one
    train_one_epoch(
        model,
        criterion,
        batches[:3],
        optimizer,
        CPU,
        epoch=1,
        accumulate=2,
        hooks=hooks,
        progress=False,
    )
    assert len(seen) == 2
    check, check_criterion = _model(cfg)
    for p, w in zip(check.parameters(), seen[0], strict=True):
        p.data.copy_(w)
    grad = _gradient(check, check_criterion, batches[2])
    for w1, w2, g in zip(seen[0], seen[1], grad, strict=True):
        torch.testing.assert_close(w2, w1 - g, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, seen[0], strict=True))


class _PoisonedCriterion(nn.Module):
    """The criterion, with one loss term made NaN on the chosen calls."""

    def __init__(self, criterion: nn.Module, bad_calls: set[int], term: str) -> None:
        super().__init__()
        self.criterion, self.bad_calls, self.term = criterion, bad_calls, term
        self.calls = 0

    def forward(self, outputs, targets, num_boxes=None):
        losses = self.criterion(outputs, targets, num_boxes)
        self.calls += 1
        if self.calls - 1 in self.bad_calls:
            value = losses.terms[self.term]
            losses.terms[self.term] = value * math.nan
            losses.total = losses.total + losses.terms[self.term]
        return losses


def _run_recording(model, criterion, loader, guard):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = [_weights(model)]
    taken = []

    def after(position, ok):
        seen.append(_weights(model))
        taken.append(ok)

    stats = train_one_epoch(
        model,
        criterion,
        loader,
        optimizer,
        CPU,
        epoch=1,
        clip_max_norm=0.1,
        guard=guard,
        hooks=StepHooks(after=after),
        progress=False,
    )
    return stats, seen, taken


def test_a_nan_loss_term_skips_the_step_and_names_the_term(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    lines: list[str] = []
    poisoned = _PoisonedCriterion(criterion, {1}, "loss_giou")
    stats, seen, taken = _run_recording(
        model, poisoned, batches[:3], NonFiniteGuard(3, warn=lines.append)
    )
    assert taken == [True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))  # skipped
    assert any(not torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))
    assert len(lines) == 1 and "step 1" in lines[0] and "loss_giou=nan" in lines[0]
    assert stats["steps"] == 2 and stats["skipped"] == 1 and math.isfinite(stats["loss"])
    assert all(torch.isfinite(w).all() for w in seen[-1])


def test_a_nan_image_is_skipped_and_the_weights_stay_finite(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    images, targets = batches[1]
    poisoned = images.images.clone()
    poisoned[0, :, 3:9, 3:9] = math.nan
    bad_batch = (dataclasses.replace(images, images=poisoned), targets)
    _stats, seen, taken = _run_recording(
        model, criterion, [batches[0], bad_batch, batches[2]], NonFiniteGuard(2)
    )
    assert taken == [True, False, True]
    assert all(torch.isfinite(w).all() for w in seen[-1])


def test_consecutive_bad_steps_stop_the_run_with_one_line(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    poisoned = _PoisonedCriterion(criterion, {1, 2}, "loss_bbox")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 2: 2 step\(s\) in a row") as err:
        _run_recording(model, poisoned, batches[:4], NonFiniteGuard(2))
    assert "loss_bbox=nan" in str(err.value) and "\n" not in str(err.value)


def test_without_a_guard_the_first_bad_step_stops(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    poisoned = _PoisonedCriterion(criterion, {0}, "loss_ce")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match="loss_ce=nan"):
        train_one_epoch(model, poisoned, batches[:2], optimizer, CPU, epoch=1, progress=False)


def test_the_schedule_hook_sees_the_run_step_before_each_update(setup):
    cfg, batches = setup
    model, criterion = _model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps: list[int] = []
    from detrkit.engine.loop import EpochPosition

    train_one_epoch(
        model,
        criterion,
        batches[:4],
        optimizer,
        CPU,
        epoch=3,
        accumulate=2,
        hooks=StepHooks(before=steps.append),
        start=EpochPosition(step=10),
        progress=False,
    )
    assert steps == [10, 11]


def test_accumulate_below_one_is_refused():
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        train_one_epoch(nn.Linear(1, 1), nn.Identity(), [], None, CPU, epoch=1, accumulate=0)
