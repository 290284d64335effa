"""train_one_epoch / evaluate: learning on a fixed batch, mixed precision, and COCO scoring in
the pixels of the original images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from detrkit.config import ConfigError
from detrkit.criterion.set_loss import build_criterion
from detrkit.data.build import build_datasets, build_loader
from detrkit.engine.evaluation import CocoEvaluator
from detrkit.engine.loop import evaluate, to_float32, train_one_epoch
from detrkit.engine.optim import build_optimizer
from detrkit.inference.postprocess import build_postprocessor
from detrkit.models import build_model
from detrkit.structures import DetectorOutput, LayerOutput
from tests.conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    cfg = tiny_config(tmp)
    train_ds, val_ds = build_datasets(cfg.data)
    return cfg, train_ds, val_ds


def _pieces(cfg, lr=1e-3):
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, lr=lr, lr_backbone=lr, weight_decay=0.0)
    return model, criterion, optimizer


def test_overfits_a_fixed_batch(setup):
    cfg, train_ds, _ = setup
    model, criterion, optimizer = _pieces(cfg, lr=3e-4)  # 1e-3 makes the loss jump around
    fixed = next(iter(build_loader(train_ds, 4, train=False, num_workers=0, seed=0)))
    seen: list[float] = []
    stats = train_one_epoch(
        model,
        criterion,
        [fixed] * 30,
        optimizer,
        CPU,
        epoch=1,
        clip_max_norm=0.1,
        progress=False,
        log_fn=lambda step, values: seen.append(values["loss"]),
    )
    assert len(seen) == 30 and stats["steps"] == 30
    # seeds 0-3 give 0.63-0.70 (2026-12-02): a margin, not a tuned threshold
    assert sum(seen[-5:]) / 5 < 0.8 * sum(seen[:5]) / 5
    assert stats["loss"] == pytest.approx(sum(seen) / 30)
    assert {"loss_ce", "loss_bbox", "loss_giou", "grad_norm"} <= stats.keys()


def test_max_steps_caps_the_epoch_and_clipping_bounds_the_update(setup):
    cfg, train_ds, _ = setup
    model, criterion, optimizer = _pieces(cfg, lr=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loader = build_loader(train_ds, 4, train=True, num_workers=0, seed=0)
    stats = train_one_epoch(
        model,
        criterion,
        loader,
        optimizer,
        CPU,
        epoch=1,
        clip_max_norm=0.01,
        max_steps=1,
        progress=False,
    )
    assert stats["steps"] == 1 and stats["grad_norm"] > 0.01
    change = torch.sqrt(
        sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))
    )
    assert change.item() == pytest.approx(0.01, rel=1e-3)  # SGD lr 1: |step| = clipped norm


def test_bf16_autocast_trains_with_a_float32_criterion(setup):
    cfg, train_ds, _ = setup
    model, criterion, optimizer = _pieces(cfg)
    seen_dtypes = []

    def spy(outputs, targets, num_boxes=None):
        seen_dtypes.append(outputs.logits.dtype)
        return criterion(outputs, targets, num_boxes)

    spy_criterion = nn.Module()
    spy_criterion.forward = spy  # type: ignore[method-assign]
    loader = build_loader(train_ds, 4, train=True, num_workers=0, seed=0)
    stats = train_one_epoch(
        model,
        spy_criterion,
        loader,
        optimizer,
        CPU,
        epoch=1,
        amp="bf16",
        max_steps=1,
        progress=False,
    )
    assert seen_dtypes == [torch.float32]
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_fp16_needs_cuda(setup):
    cfg, train_ds, _ = setup
    model, criterion, optimizer = _pieces(cfg)
    loader = build_loader(train_ds, 4, train=True, num_workers=0, seed=0)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train_one_epoch(
            model,
            criterion,
            loader,
            optimizer,
            CPU,
            epoch=1,
            amp="fp16",
            scaler=torch.amp.GradScaler("cpu"),
            progress=False,
        )


def test_to_float32_converts_nested_outputs():
    half = torch.zeros(1, 2, 3, dtype=torch.bfloat16)
    out = DetectorOutput(half, half, aux=[LayerOutput(half, half)])
    converted = to_float32(out)
    assert converted.logits.dtype == converted.aux[0].boxes.dtype == torch.float32
    assert dataclasses.is_dataclass(converted) and isinstance(converted, DetectorOutput)


class Oracle(nn.Module):
    """Predicts the ground truth: the targets of the batch are handed over by the loader."""

    def __init__(self, num_classes: int, num_queries: int = 5) -> None:
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.pending: list = []

    def forward(self, images, mask, targets=None):
        b = images.shape[0]
        logits = torch.full((b, self.num_queries, self.num_classes + 1), -10.0)
        logits[:, :, -1] = 10.0  # "no object" unless a target is placed
        boxes = torch.full((b, self.num_queries, 4), 0.5)
        for i, target in enumerate(self.pending):
            n = len(target)
            boxes[i, :n] = target.boxes
            logits[i, torch.arange(n), target.labels] = 10.0
            logits[i, :n, -1] = -10.0
        return DetectorOutput(logits, boxes)


def test_evaluate_scores_boxes_in_original_pixels(tmp_path):
    # images are 64 px on disk but the model sees them at 96 px: boxes must be scaled back
    cfg = tiny_config(tmp_path, "data.augment.val_scale=96", "data.augment.max_size=160")
    _, val_ds = build_datasets(cfg.data)
    oracle = Oracle(cfg.model.num_classes)

    def feeding(loader):
        for batch, targets in loader:
            assert tuple(batch.images.shape[-2:]) == (96, 96)
            oracle.pending = targets
            yield batch, targets

    loader = build_loader(val_ds, 4, train=False, num_workers=0, seed=0)
    evaluator = CocoEvaluator(val_ds.annotations_file, val_ds.label_map)
    metrics = evaluate(
        oracle, build_postprocessor(cfg), feeding(loader), evaluator, CPU, progress=False
    )
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["AP75"] == pytest.approx(1.0, abs=1e-6)
