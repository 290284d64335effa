"""Trainer: the files of a run, resuming exactly, device and class-count checks."""

from __future__ import annotations

import json

import pytest
import torch

from detrkit.config import ConfigError
from detrkit.engine import Trainer
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.trainer import resolve_device
from detrkit.presets import load_config
from tests.conftest import tiny_config


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_run_writes_config_metrics_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=2", "train.eval_every=2")
    lines = []
    trainer = Trainer(cfg, progress=False, echo=lines.append)
    result = trainer.fit()
    run = tmp_path / "run"
    assert load_config(run / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["eval"] == {}  # eval_every=2: epoch 1 is not evaluated
    assert {"AP", "AP50", "loss"} <= rows[1]["eval"].keys()
    assert rows[0]["train"]["steps"] == 2 and rows[0]["lr"] == cfg.train.lr
    assert rows[0]["lr_backbone"] == cfg.train.lr_backbone and rows[0]["time_s"] > 0
    assert [line.split()[1] for line in lines[:2]] == ["1/2", "2/2"]
    assert lines[2:] == [f"curves: {run / 'curves.png'}"] and (run / "curves.png").is_file()
    assert result.epochs == 2 and result.best_ap == rows[1]["eval"]["AP"]
    for name in ("checkpoint_last", "checkpoint_best"):
        state, saved_cfg, label_map, meta = load_checkpoint(run / name)
        assert saved_cfg == cfg and label_map.names == ["circle", "square", "triangle", "cross"]
        assert meta["extra"]["train_batch_size"] == cfg.train.batch_size
    assert (run / "checkpoint_last.train.pt").is_file()
    assert not (run / "checkpoint_best.train.pt").exists()
    state, *_ = load_checkpoint(result.last_checkpoint)  # the weights after the last epoch
    assert all(torch.equal(state[k], v) for k, v in _params(trainer).items())


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # uninterrupted: 2 epochs of 2 steps
    straight = Trainer(tiny_config(tmp_path / "a", "train.epochs=2"), progress=False, echo=None)
    straight.fit()
    # interrupted after epoch 1, then resumed from checkpoint_last in a fresh Trainer
    Trainer(tiny_config(tmp_path / "b", "train.epochs=1"), progress=False, echo=None).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", "train.epochs=2"), progress=False, echo=None)
    before = _params(resumed)
    result = resumed.fit(resume=tmp_path / "b" / "run" / "checkpoint_last")
    assert result.epochs == 2 and [r["epoch"] for r in result.history] == [2]

    expected, got = _params(straight), _params(resumed)
    assert any(not torch.equal(before[k], got[k]) for k in got)  # it did train
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert all(
        torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"]
    )
    assert straight.step == resumed.step > 0
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_evaluating_does_not_change_the_training_run(tmp_path):
    """Same weights whether or not the run evaluates before and between epochs."""
    quiet = Trainer(
        tiny_config(tmp_path / "a", "train.epochs=2", "train.eval_every=5"),
        progress=False,
        echo=None,
    )
    quiet.fit()
    busy = Trainer(
        tiny_config(tmp_path / "b", "train.epochs=2", "train.eval_every=1"),
        progress=False,
        echo=None,
    )
    busy.evaluate()
    busy.fit()
    expected, got = _params(quiet), _params(busy)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resume_of_a_finished_run_says_how_to_continue(tmp_path):
    cfg = tiny_config(tmp_path)
    Trainer(cfg, progress=False, echo=None).fit()
    with pytest.raises(ConfigError, match="raise train.epochs"):
        Trainer(cfg, progress=False, echo=None).fit(resume=tmp_path / "run" / "checkpoint_last")


def test_too_few_classes_for_the_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes=4"):
        Trainer(tiny_config(tmp_path, "model.num_classes=2"), progress=False, echo=None)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_trains_on_cuda(tmp_path, amp):
    cfg = tiny_config(tmp_path, "train.device=cuda", f"train.amp={amp}")
    trainer = Trainer(cfg, progress=False, echo=None)
    result = trainer.fit()
    assert next(trainer.model.parameters()).is_cuda
    assert result.history[0]["train"]["loss"] > 0
