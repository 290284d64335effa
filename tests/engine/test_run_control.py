"""What a run does besides stepping: the EMA, early stopping, mid-epoch checkpoints that
resume exactly, a diverging run that leaves a checkpoint, and the bad-input lines."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detrkit.config import ConfigError
from detrkit.engine import Trainer
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.ema import ModelEma
from detrkit.engine.guard import TrainingDiverged
from detrkit.engine.state import load_train_state
from tests.conftest import tiny_config


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_the_weighted_average_and_keeps_ties():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied, as shared heads are
    ema = ModelEma(model, decay=0.9)
    old = _state(ema.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for key, value in _state(ema.module).items():
        expected = 0.9 * old[key] + 0.1 * model.state_dict()[key]
        torch.testing.assert_close(value, expected)
    assert ema.module[1].weight is ema.module[0].weight
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_decay_warms_up_from_zero():
    ema = ModelEma(nn.Linear(1, 1), decay=0.999, warmup_steps=100)
    first = ema.current_decay()
    assert first == pytest.approx(0.999 * (1 - math.exp(-1 / 100)))
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.999, abs=1e-6)


def test_ema_run_checkpoints_the_average_and_resumes_exactly(tmp_path):
    ema = ["train.ema.enabled=true", "train.ema.decay=0.5", "train.ema.warmup_steps=0"]
    straight = Trainer(
        tiny_config(tmp_path / "a", "train.epochs=2", *ema), progress=False, echo=None
    )
    straight.fit()
    run = tmp_path / "a" / "run"
    weights, *_ = load_checkpoint(run / "checkpoint_last")
    assert _equal(weights, _state(straight.ema.module))  # the checkpoint holds the average
    assert not _equal(weights, _state(straight.model))
    state = load_train_state(run / "checkpoint_last")
    assert _equal(state.model, _state(straight.model)) and state.ema == {"updates": 4}

    Trainer(tiny_config(tmp_path / "b", "train.epochs=1", *ema), progress=False, echo=None).fit()
    resumed = Trainer(
        tiny_config(tmp_path / "b", "train.epochs=2", *ema), progress=False, echo=None
    )
    resumed.fit(resume=tmp_path / "b" / "run" / "checkpoint_last")
    assert _equal(_state(resumed.model), _state(straight.model))
    assert _equal(_state(resumed.ema.module), _state(straight.ema.module))


# ----------------------------------------------------------------------------- early stop


def test_patience_stops_after_evaluations_without_a_better_ap(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.epochs=6", "train.patience=2")
    trainer = Trainer(cfg, progress=False, echo=None)
    aps = iter([0.30, 0.50, 0.40, 0.45, 0.60, 0.70])
    monkeypatch.setattr(trainer, "evaluate", lambda: {"AP": next(aps)})
    result = trainer.fit()
    # best at epoch 2; epochs 3 and 4 do not beat it: stop after epoch 4
    assert result.epochs == 4 and result.best_ap == 0.50
    assert result.stopped_early is not None and "2 evaluation(s)" in result.stopped_early


# ----------------------------------------------------------------------------- mid-epoch


class _Stop(Exception):
    pass


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # DINO: the denoising noise draws from torch's generator inside the forward
    extra = ["train.epochs=2", "train.checkpoint_every_steps=1", "train.warmup_steps=3"]

    def tiny(path):
        return tiny_config(path, *extra, preset="test_dino_tiny")

    straight = Trainer(tiny(tmp_path / "a"), progress=False, echo=None)
    expected = straight.fit().history[1]["train"]

    broken = Trainer(tiny(tmp_path / "b"), progress=False, echo=None)
    after = broken._after_step

    def stop_after_step_3(position, taken):
        after(position, taken)  # checkpoint_last written for this step
        if position.step == 3:
            raise _Stop

    monkeypatch.setattr(broken, "_after_step", stop_after_step_3)
    with pytest.raises(_Stop):
        broken.fit()
    last = tmp_path / "b" / "run" / "checkpoint_last"
    state = load_train_state(last)
    assert (state.epoch, state.step, state.epoch_batches) == (1, 3, 1)  # inside epoch 2

    resumed = Trainer(tiny(tmp_path / "b"), progress=False, echo=None)
    result = resumed.fit(resume=last)
    assert _equal(_state(resumed.model), _state(straight.model))
    # the epoch's logged means include the steps trained before the interruption
    got = result.history[0]["train"]
    assert got["steps"] == expected["steps"] == 2
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_a_loadable_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.epochs=2", "train.max_bad_steps=2")
    trainer = Trainer(cfg, progress=False, echo=None)
    forward = trainer.criterion.forward
    calls = {"n": 0}

    def poisoned(outputs, targets, num_boxes=None):
        losses = forward(outputs, targets, num_boxes)
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 is fine, then every step is NaN
            losses.total = losses.total * math.nan
        return losses

    monkeypatch.setattr(trainer.criterion, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="last good weights: .*checkpoint_last"):
        trainer.fit()
    weights, *_ = load_checkpoint(tmp_path / "run" / "checkpoint_last")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert _equal(weights, _state(trainer.model))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.accumulate=0", "train.accumulate: must be an integer >= 1"),
        ("train.ema.decay=-0.1", r"train.ema.decay: must be in \[0, 1\)"),
        ("train.patience=0", "train.patience: must be >= 1 or null"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0"),
        ("train.amp=fp16", "train.amp: fp16 needs a CUDA device"),
    ],
)
def test_bad_settings_are_one_line_each(tmp_path, override, needle):
    if override == "train.amp=fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    with pytest.raises(ConfigError, match=needle) as err:
        Trainer(tiny_config(tmp_path, override), progress=False, echo=None)
    assert "\n" not in str(err.value)


def test_resume_with_another_config_names_the_fields(tmp_path):
    Trainer(tiny_config(tmp_path, "train.epochs=1"), progress=False, echo=None).fit()
    other = tiny_config(tmp_path, "train.epochs=2", "train.lr=0.5", "train.accumulate=2")
    trainer = Trainer(other, progress=False, echo=None)
    with pytest.raises(ConfigError, match="another config") as err:
        trainer.fit(resume=tmp_path / "run" / "checkpoint_last")
    message = str(err.value)
    assert "train.lr: 0.0002 -> 0.5" in message, message
    assert "train.accumulate: 1 -> 2" in message
    assert "train.epochs: " not in message  # a longer run is what resuming is for
