import json

import pytest
import torch
from torch import nn

from detrkit.config import to_dict
from detrkit.engine.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_model,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from detrkit.models import build_model
from detrkit.presets import get_preset
from detrkit.structures import LabelMap


def test_paths_from_prefix_file_or_directory(tmp_path):
    for given in (
        tmp_path / "ckpt",
        tmp_path / "ckpt.json",
        tmp_path / "ckpt.safetensors",
        tmp_path / "ckpt.train.pt",
    ):
        p = checkpoint_paths(given)
        assert (p["weights"].name, p["meta"].name, p["train"].name) == (
            "ckpt.safetensors",
            "ckpt.json",
            "ckpt.train.pt",
        )
    assert checkpoint_paths(tmp_path)["meta"] == tmp_path / "model.json"


def test_save_load_model_round_trip(tmp_path):
    cfg = get_preset("test_detr_tiny")
    model = build_model(cfg).eval()
    lm = LabelMap([3, 7, 9, 11], ["a", "b", "c", "d"])
    meta_path = save_checkpoint(tmp_path / "run", model, cfg, lm, extra={"epoch": 4})
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "detrkit-checkpoint" and meta["extra"] == {"epoch": 4}
    loaded, cfg2, lm2, meta2 = load_model(tmp_path / "run")
    assert to_dict(cfg2) == to_dict(cfg) and lm2 == lm and meta2["extra"]["epoch"] == 4
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_shared_tensors_are_stored_once(tmp_path):
    cfg = get_preset("test_detr_tiny")
    shared = nn.Linear(2, 2)
    state = {"a.weight": shared.weight, "b.weight": shared.weight, "c": torch.ones(3)}
    save_checkpoint(tmp_path / "s", state, cfg)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "s.safetensors"))) == {"a.weight", "c"}
    loaded, *_ = load_checkpoint(tmp_path / "s")
    assert set(loaded) == {"a.weight", "b.weight", "c"}
    assert torch.equal(loaded["b.weight"], shared.weight.detach())


def test_train_state_uses_weights_only(tmp_path):
    opt_state = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]}
    save_train_state(
        tmp_path / "run", {"optimizer": opt_state, "epoch": 2, "rng": torch.get_rng_state()}
    )
    back = load_train_state(tmp_path / "run.json")
    assert back["epoch"] == 2 and back["optimizer"]["param_groups"][0]["lr"] == 1e-4
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        load_train_state(tmp_path / "other")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a detrkit checkpoint"):
        load_checkpoint(tmp_path / "x")
    (tmp_path / "y.json").write_text(
        json.dumps({"format": "detrkit-checkpoint", "format_version": 99})
    )
    with pytest.raises(ValueError, match="newer"):
        load_checkpoint(tmp_path / "y")
