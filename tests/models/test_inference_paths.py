"""Inference-only fast paths leave the model's outputs unchanged: the FFN in chunks of tokens
without autograd, and the sparse MSDA backend that ``auto`` picks on the CPU."""

from __future__ import annotations

import pytest
import torch

import detrkit.models.layers as layers
from detrkit.config import apply_overrides
from detrkit.models import build_model
from detrkit.presets import get_preset
from tests.conftest import TINY_PRESETS, padded_batch

DEFORMABLE = [n for n in TINY_PRESETS if get_preset(n).model.transformer.attention == "deformable"]


def _model(name: str, *overrides: str):
    torch.manual_seed(0)
    return build_model(apply_overrides(get_preset(name), list(overrides))).eval()


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_chunked_ffn_equals_the_whole(name, monkeypatch):
    model = _model(name)
    images, mask = padded_batch([(64, 96), (48, 64)])
    with torch.enable_grad():  # the plain path
        expected = model(images, mask)
    monkeypatch.setattr(layers, "FFN_CHUNK", 7)
    calls = []
    for module in model.modules():
        if isinstance(module, layers.EncoderLayer):
            module.linear1.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[-2]))
    with torch.no_grad():
        got = model(images, mask)
    assert calls and max(calls) <= 7 < sum(calls)  # the encoder's FFN really ran in chunks
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DEFORMABLE)
def test_sparse_backend_model_equals_the_reference(name):
    images, mask = padded_batch([(64, 96), (48, 64)])
    outputs = []
    for backend in ("reference", "sparse"):
        with torch.no_grad():
            outputs.append(_model(name, f"model.transformer.msda_backend={backend}")(images, mask))
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs[1].boxes, outputs[0].boxes, atol=1e-5, rtol=1e-4)
