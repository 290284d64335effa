"""Checkpoints of format 1 (one transformer class per family) load into today's single
transformer and reproduce the outputs they were saved with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from detrkit.config import ConfigError, to_dict
from detrkit.engine import Trainer
from detrkit.engine.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, save_checkpoint
from detrkit.engine.migrate import migrate_v1, v1_family
from tests.conftest import tiny_config
from tests.engine.legacy_weights import PRESETS, backbone_value, inputs

HERE = Path(__file__).parent / "checkpoints_v1"


def _restore(name: str, folder: Path) -> Path:
    """Rebuild the complete format-1 checkpoint ``name`` in ``folder``: float32 weights with
    the elided backbone regenerated."""
    meta = json.loads((HERE / f"{name}.json").read_text())
    weights = {k: v.float() for k, v in load_file(str(HERE / f"{name}.safetensors")).items()}
    for key, shape in meta.pop("elided_backbone").items():
        weights[key] = backbone_value(key, tuple(shape))
    save_file(weights, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / name


@pytest.mark.parametrize("name", PRESETS)
def test_format_1_checkpoint_reproduces_its_outputs(name, tmp_path):
    path = _restore(name, tmp_path)
    model, cfg, _, meta = load_model(path)
    assert meta["format_version"] == 1 < FORMAT_VERSION
    expected = load_file(str(HERE / f"{name}.outputs.safetensors"))
    with torch.no_grad():
        out = model(*inputs())
    got = {"logits": out.logits, "boxes": out.boxes}
    for i, layer in enumerate(out.aux):
        got[f"aux.{i}.logits"], got[f"aux.{i}.boxes"] = layer.logits, layer.boxes
    if out.enc is not None:
        got["enc.logits"], got["enc.boxes"] = out.enc.logits, out.enc.boxes
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)
    # saved again, it is a format-2 checkpoint of the same model
    save_checkpoint(tmp_path / "again", model, cfg)
    state, cfg2, _, meta2 = load_checkpoint(tmp_path / "again")
    assert meta2["format_version"] == FORMAT_VERSION and to_dict(cfg2) == to_dict(cfg)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_families_and_config_fields_of_format_1():
    configs = {name: json.loads((HERE / f"{name}.json").read_text())["config"] for name in PRESETS}
    families = {name: v1_family(c["model"]) for name, c in configs.items()}
    assert families == {
        "test_detr_tiny": "detr",
        "test_dn_detr_tiny": "dab",
        "test_deformable_detr_tiny": "deformable",
        "test_deformable_detr_tiny_two_stage": "deformable",
        "test_dn_deformable_detr_tiny": "anchor_deformable",
        "test_dino_tiny": "anchor_deformable",
    }
    dn_detr, _ = migrate_v1(configs["test_dn_detr_tiny"], {})
    m = dn_detr["model"]
    # format 1's single-scale decoder kept the refined anchors' gradient: look forward twice
    assert m["queries"]["box_update"] == "look_forward_twice"
    assert (m["queries"]["content"], m["denoising"]["content_indicator"]) == ("label", True)
    assert m["transformer"]["conditional_attention"] and m["neck"]["norm"] == "none"
    assert "learned_content" not in m["queries"]
    # the joint [Q, 2d] query embedding of Deformable DETR splits into its two halves
    joint = torch.randn(30, 128)
    _, state = migrate_v1(
        configs["test_deformable_detr_tiny"], {"transformer.query_embed.weight": joint}
    )
    assert torch.equal(state["transformer.queries.query_pos.weight"], joint[:, :64])
    assert torch.equal(state["transformer.queries.content.weight"], joint[:, 64:])


def test_a_format_1_run_cannot_be_resumed_but_its_weights_load(tmp_path):
    path = _restore("test_detr_tiny", tmp_path)
    shutil.copy(path.with_suffix(".json"), tmp_path / "checkpoint_last.json")
    shutil.copy(path.with_suffix(".safetensors"), tmp_path / "checkpoint_last.safetensors")
    torch.save(
        {"epoch": 1, "best_ap": -1.0, "optimizer": {}, "scheduler": {}},
        tmp_path / "checkpoint_last.train.pt",
    )
    trainer = Trainer(tiny_config(tmp_path, "train.epochs=2"), progress=False, echo=None)
    with pytest.raises(ConfigError, match="checkpoint format 1.*cannot be resumed"):
        trainer.fit(resume=tmp_path / "checkpoint_last")
    model, *_ = load_model(tmp_path / "checkpoint_last")
    assert model.transformer.queries.query_pos.weight.shape == (20, 64)
