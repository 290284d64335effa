"""The published full-size models: every key of ``keys_full_size.json`` (dumped from the
upstream code at its published configurations) maps onto the detrkit model that the
converter configures, with the right shape, loads strictly, and writes back to exactly the
official key set, aliases included. No forward pass: the models are built on the meta device
and the official tensors are expanded scalars (one distinct value per tensor)."""

from __future__ import annotations

import json
import warnings
from functools import cache

import pytest
import torch

from detrkit.config import Config
from detrkit.convert import detect_family, official_to_config
from detrkit.convert.keymap import load_strict
from detrkit.convert.official import get_converter
from detrkit.models import build_model
from detrkit.presets import get_preset
from tests.conftest import fixtures_dir
from tests.convert.official_cases import model_dict

KEYS_FULL_SIZE = fixtures_dir() / "keys_full_size.json"

# official model (keys_full_size.json) -> the detrkit preset of the same published system
PRESET_OF = {
    "detr_r50": "detr_r50",
    "deformable_detr_r50_single_scale": "deformable_detr_r50_single_scale",
    "deformable_detr_r50": "deformable_detr_r50",
    "deformable_detr_r50_refine": "deformable_detr_r50_refine",
    "deformable_detr_r50_twostage_refine": "deformable_detr_r50_two_stage",
    "dab_detr_r50": "dab_detr_r50",
    "dn_dab_detr_r50": "dn_detr_r50",
    "dab_deformable_detr_r50": "dab_deformable_detr_r50",
    "dn_deformable_detr_r50": "dn_deformable_detr_r50",
    "dino_4scale_r50": "dino_4scale_r50",
    "dino_5scale_r50": "dino_5scale_r50",
}


@cache
def full_size_models() -> dict[str, dict]:
    """``models`` of ``keys_full_size.json`` ({} when the file is absent)."""
    if not KEYS_FULL_SIZE.is_file():
        return {}
    return json.loads(KEYS_FULL_SIZE.read_text())["models"]


def _names() -> list:
    names = sorted(full_size_models())
    return names or [pytest.param("none", marks=pytest.mark.skip("no keys_full_size.json"))]


def official_state(spec: dict) -> dict[str, torch.Tensor]:
    """A stand-in official state dict: one distinct value per tensor, expanded to its shape
    (no memory); alias keys hold their canonical tensor, as in the upstream model."""
    state = {
        key: torch.tensor(float(i)).expand(*info["shape"])
        for i, (key, info) in enumerate(spec["keys"].items())
    }
    for canonical, aliases in spec["alias_groups"].items():
        for alias in aliases:
            state[alias] = state[canonical]
    return state


def _value(tensor: torch.Tensor) -> float:
    """The value of a tensor of :func:`official_state` (constant: its first element)."""
    return float(tensor[(0,) * tensor.dim()])


def expected_config(name: str) -> Config:
    """The preset of the published system, with the official ranking of encoder proposals."""
    cfg = get_preset(PRESET_OF[name])
    if cfg.model.queries.kind in ("two_stage", "mixed"):
        cfg.model.queries.select_valid_proposals = False
    return cfg


def test_every_published_model_has_a_preset() -> None:
    assert set(full_size_models()) <= set(PRESET_OF)


@pytest.mark.parametrize("name", _names())
def test_full_size_official_keys_map_and_load_strictly(name: str) -> None:
    spec = full_size_models()[name]
    state = official_state(spec)
    assert set(state) == set(spec["keys"]) and len(state) == spec["num_keys"]
    assert detect_family(state) == spec["family"]

    cfg = official_to_config(spec["config"], state)
    assert model_dict(cfg) == model_dict(expected_config(name))
    with warnings.catch_warnings():  # defaults assumed for what no weight reveals
        warnings.simplefilter("ignore")
        inferred = official_to_config({}, state)
    assert model_dict(inferred) == model_dict(cfg)

    converter = get_converter(spec["family"])
    mapped, unmatched = converter.from_official(state, cfg)
    assert unmatched == []
    with torch.device("meta"):
        model = build_model(cfg)
    own = model.state_dict()
    assert sorted(mapped) == sorted(own)
    wrong = [k for k in own if tuple(mapped[k].shape) != tuple(own[k].shape)]
    assert wrong == []
    with warnings.catch_warnings():  # loading into meta tensors is a no-op, said by torch
        warnings.simplefilter("ignore")
        load_strict(model, mapped, name)

    back = converter.to_official(mapped, cfg)
    assert sorted(back) == sorted(state)
    changed = [
        k for k in state if back[k].shape != state[k].shape or _value(back[k]) != _value(state[k])
    ]
    assert changed == []


@pytest.mark.parametrize("name", _names())
def test_published_arguments_alone_give_the_preset(name: str) -> None:
    """The published configuration without weights gives the preset, nothing assumed."""
    spec = full_size_models()[name]
    args = {"dilation": False, **spec["config"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = official_to_config(args, family=spec["family"])
    assert model_dict(cfg) == model_dict(expected_config(name))
