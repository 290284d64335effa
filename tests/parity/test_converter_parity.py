"""The converters against the official state dicts: writing a converted model back gives the
official checkpoint key for key (aliases included), bit for bit; DAB-DETR / DN-DETR infer their
architecture from the weights."""

from __future__ import annotations

import warnings

import pytest
import torch

from detrkit.config import to_dict
from detrkit.convert import to_official_state_dict
from detrkit.convert.official import get_converter
from tests.conftest import load_fixture
from tests.parity._support import converted, names, official_state

pytestmark = pytest.mark.parity

ALL = names()
DAB_FIXTURES = names(["dab_detr", "dn_dab_detr"])


@pytest.mark.parametrize("name", ALL)
def test_to_official_round_trip(name: str) -> None:
    fx = load_fixture(name)
    result = converted(name)
    official = to_official_state_dict(result.model.state_dict(), result.config, fx.family)
    state = official_state(name)
    assert sorted(official) == sorted(state)
    assert [k for k in state if not torch.equal(official[k], state[k])] == []


@pytest.mark.parametrize("name", DAB_FIXTURES)
def test_dab_shape_inference(name: str) -> None:
    """Only what the weights cannot tell is passed; the rest is inferred: same config."""
    fx = load_fixture(name)
    args = fx.meta["official_args"]
    keep = ("nheads", "dilation", "num_select", "scalar")  # scalar: DN-DETR's group count
    converter, state = get_converter(fx.family), official_state(name)
    full = converter.to_config(args, state)
    partial = converter.to_config({k: args[k] for k in keep if k in args}, state)
    assert to_dict(partial.model) == to_dict(full.model)
    assert full.model.num_classes == fx.meta["config"]["num_classes"]
    assert full.model.transformer.activation == "prelu"
    assert (full.model.denoising.kind == "dn") == (fx.family == "dn_dab_detr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converter.to_config({}, state)
    assert "'nheads'" in " ".join(str(w.message) for w in caught)
