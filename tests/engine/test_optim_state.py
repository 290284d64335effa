"""Optimiser parameter groups, the step schedule, and the RNG part of the resume state."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn

from detrkit.engine.optim import (
    LrSchedule,
    build_optimizer,
    group_lrs,
    is_backbone_param,
    param_groups,
)
from detrkit.engine.state import (
    TrainState,
    capture_rng,
    load_train_state,
    restore_rng,
    save_train_state,
    seed_everything,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
        self.backbone[0].weight.requires_grad_(False)  # a frozen stage
        self.transformer = nn.ModuleDict(
            {"sampling_offsets": nn.Linear(4, 2), "ffn": nn.Linear(4, 4)}
        )
        self.head = nn.Linear(4, 2)


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_backbone_name_rule():
    assert is_backbone_param("backbone.body.layer1.0.conv1.weight")
    assert is_backbone_param("module.backbone.body.conv1.weight")  # DDP wrapper
    assert not is_backbone_param("transformer.backbone_proj.weight")
    assert not is_backbone_param("head.weight")


def test_param_groups_split_rates_and_skip_frozen():
    model = Toy()
    groups = {
        g["name"]: g
        for g in param_groups(
            model, lr=1e-4, lr_backbone=1e-5, weight_decay=0.05, linear_proj_lr_mult=0.1
        )
    }
    assert set(groups) == {"main", "backbone", "linear_proj"}
    assert _ids(groups["backbone"]) == {
        id(model.backbone[0].bias),
        id(model.backbone[1].weight),
        id(model.backbone[1].bias),
    }
    assert _ids(groups["linear_proj"]) == {
        id(p) for p in model.transformer["sampling_offsets"].parameters()
    }
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert groups["main"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert all(g["weight_decay"] == 0.05 for g in groups.values())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*(_ids(g) for g in groups.values())) == trainable


def test_without_linear_proj_mult_the_projections_train_at_lr():
    groups = param_groups(Toy(), lr=1e-4, lr_backbone=1e-5, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["main", "backbone"]


def test_step_schedule_drops_every_group_after_lr_drop_epochs():
    model = Toy()
    opt = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    sched = LrSchedule("step", steps_per_epoch=3, total_steps=12, lr_drop=2, gamma=0.1)
    seen = []
    for step in range(12):
        sched.apply(opt, step)
        seen.append(group_lrs(opt))
        opt.step()
    assert [s["lr"] for s in seen[::3]] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    assert [s["lr_backbone"] for s in seen[::3]] == pytest.approx([1e-5, 1e-5, 1e-6, 1e-6])
    assert len({s["lr"] for s in seen[:6]}) == 1  # constant within the epochs


def test_warmup_rises_linearly_then_hands_over_to_the_schedule():
    sched = LrSchedule("step", steps_per_epoch=10, total_steps=40, warmup_steps=4, lr_drop=2)
    assert [sched.factor(i) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert sched.factor(20) == pytest.approx(0.1)


def test_cosine_anneals_from_the_base_rate_to_the_floor():
    sched = LrSchedule("cosine", steps_per_epoch=10, total_steps=100, min_ratio=0.1)
    values = [sched.factor(i) for i in range(101)]
    assert values[0] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.55)  # halfway: the mean of 1 and the floor
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_the_schedule_rescales_from_the_base_rate_not_the_current_one():
    opt = build_optimizer(Toy(), lr=1e-3, lr_backbone=1e-4, weight_decay=0.0)
    sched = LrSchedule("cosine", steps_per_epoch=1, total_steps=4)
    for step in (3, 3, 0):
        sched.apply(opt, step)
    assert group_lrs(opt)["lr"] == pytest.approx(1e-3)


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_round_trip_through_the_train_state_file(tmp_path):
    seed_everything(3)
    model = Toy()
    opt = build_optimizer(model, lr=1e-3, lr_backbone=1e-3, weight_decay=0.0)
    model.head(torch.ones(1, 4)).sum().backward()
    opt.step()
    _draw()
    state = TrainState(
        epoch=4,
        best_ap=0.25,
        optimizer=opt.state_dict(),
        step=7,
        rng=capture_rng(),
    )
    expected = _draw()
    save_train_state(tmp_path / "ckpt", state)
    assert (tmp_path / "ckpt.train.pt").is_file()
    _draw()  # move every generator on

    loaded = load_train_state(tmp_path / "ckpt.safetensors")  # any of the checkpoint names
    restore_rng(loaded.rng)
    assert _draw() == expected
    assert (loaded.epoch, loaded.best_ap, loaded.step) == (4, 0.25, 7)
    fresh = build_optimizer(Toy(), lr=1e-3, lr_backbone=1e-3, weight_decay=0.0)
    fresh.load_state_dict(loaded.optimizer)
    saved, restored = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert saved and saved.keys() == restored.keys()
    assert all(torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved)


def test_missing_train_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.pt"):
        load_train_state(tmp_path / "nothing")
