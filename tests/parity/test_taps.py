"""The transformer's internals against the official ``taps.transformer_return.*`` (eval mode,
float32), captured with forward hooks on ``model.transformer.encoder`` / ``.queries`` /
``.decoder``; the layout of each tap is in :func:`tests.parity._support.official_taps`.

Every stored tap of every fixture is compared: DETR decoder states (after the decoder norm) and
encoder memory; Deformable / DAB / DN decoder states, initial references and the reference after
each layer, two-stage encoder logits and proposal boxes before the sigmoid; DINO decoder states,
all references, the selected encoder features, their refined boxes and the raw proposals.
"""

from __future__ import annotations

import pytest
import torch

from detrkit.models.encoder import encoder_reference_points
from tests.conftest import load_fixture
from tests.parity._support import close, eval_run, names, official_taps

pytestmark = pytest.mark.parity

ALL = names()
TWO_STAGE = names(["deformable_detr"], where=lambda m: "taps.transformer_return.4" in m["taps"])


@pytest.mark.parametrize("name", ALL)
def test_taps(name: str) -> None:
    fx = load_fixture(name)
    official = fx.group("taps.transformer_return")
    ours = official_taps(fx.family, eval_run(name))
    assert sorted(ours) == sorted(official), "taps stored and taps compared differ"
    for key, (value, kind) in sorted(ours.items()):
        close(value, official[key], kind, f"{name} taps.transformer_return.{key}")


@pytest.mark.parametrize("name", TWO_STAGE)
def test_two_stage_invalid_tokens(name: str) -> None:
    """Padding / out-of-range tokens: official proposal ``+inf`` in all four coordinates;
    detrkit's anchors and boxes are exactly 1.0 there, finite elsewhere, and none is
    selected as a query."""
    fx = load_fixture(name)
    run = eval_run(name)
    unact = fx.tensors["taps.transformer_return.4"]
    invalid = torch.isinf(unact).any(-1)  # [B, S]
    assert invalid.any() and torch.equal(invalid, torch.isinf(unact).all(-1))
    assert (unact[invalid] > 0).all()
    enc = run.queries.enc
    assert torch.equal((enc.anchors == 1.0).all(-1), invalid)
    assert torch.equal((enc.boxes == 1.0).all(-1), invalid)
    assert (enc.anchors[~invalid] < 1.0).all()
    # queries start from the selected proposals: none of them is an invalid token
    initial = run.decoder.references[0]  # [B, Q, 4]
    assert (initial < 1.0).all()


def test_encoder_reference_points_follow_the_valid_ratio() -> None:
    ref = encoder_reference_points([(4, 8), (2, 4)], torch.tensor([[[0.75, 0.5], [0.75, 0.5]]]))
    assert ref.shape == (1, 32 + 8, 2, 2)
    # pixel (0, 1) of level 0: centre x = 1.5 / 6 of the image -> 1.5 / 6 * 0.75 of the map
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([1.5 / 6 * 0.75, 0.5 / 2 * 0.5]))
