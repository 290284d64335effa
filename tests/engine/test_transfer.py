"""Starting a model from weights with the same or another class count: what is loaded, what
is re-initialised (and to what), and the architecture mismatches that are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detrkit.config import ConfigError, apply_overrides
from detrkit.engine.transfer import (
    PretrainedWeights,
    adopt_model_config,
    check_architecture,
    transfer_weights,
)
from detrkit.models import build_model
from detrkit.models.heads import prior_prob_bias
from detrkit.presets import get_preset
from detrkit.structures import LabelMap
from tests.conftest import TINY_PRESETS, padded_batch

TINY = TINY_PRESETS


def _source(preset: str, seed: int = 0) -> tuple[torch.nn.Module, PretrainedWeights]:
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # values no fresh initialisation has, class heads included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    label_map = LabelMap.default(cfg.model.num_classes)
    return model, PretrainedWeights(state, cfg, label_map, f"<{preset}>", "detrkit")


def _with_classes(weights: PretrainedWeights, num_classes: int):
    model_cfg = adopt_model_config(weights, num_classes)
    cfg = dataclasses.replace(
        weights.config, model=model_cfg, postprocess=type(weights.config.postprocess)()
    )
    return build_model(cfg).eval(), cfg


def test_the_same_classes_load_every_tensor_and_give_the_same_outputs():
    source, weights = _source("test_dino_tiny")
    model, _ = _with_classes(weights, weights.model.num_classes)
    report = transfer_weights(model, weights)
    assert not report.reinitialised and not report.unused
    assert len(report.loaded) == len(source.state_dict())
    images, mask = padded_batch([(64, 48), (40, 64)])
    with torch.no_grad():
        a, b = source(images, mask), model(images, mask)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=0)


@pytest.mark.parametrize("preset", TINY)
def test_another_class_count_keeps_the_rest_and_reinitialises_the_class_parts(preset):
    _, weights = _source(preset)
    model, cfg = _with_classes(weights, 2)
    class_keys = set(model.class_dependent_keys())
    assert any(".class_embed." in k for k in class_keys)
    if cfg.model.denoising.kind != "none":
        assert "transformer.denoising.label_enc.weight" in class_keys
    report = transfer_weights(model, weights)
    assert set(report.reinitialised) == class_keys
    state = model.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], weights.state[key]), key
    rows = cfg.model.num_classes + (1 if cfg.model.class_activation == "softmax" else 0)
    for key in class_keys:
        if ".class_embed" in key:
            assert state[key].shape[0] == rows, key
            if key.endswith("bias") and cfg.model.class_activation == "sigmoid":
                # the focal-loss prior, not the source's perturbed values
                torch.testing.assert_close(
                    state[key], torch.full_like(state[key], prior_prob_bias())
                )
    images, mask = padded_batch([(64, 64)])
    with torch.no_grad():
        out = model(images, mask)
    assert out.logits.shape[-1] == rows


def test_a_fixed_label_book_follows_the_new_class_count():
    cfg = apply_overrides(get_preset("test_dino_tiny"), ["model.denoising.labelbook_size=10"])
    weights = PretrainedWeights({}, cfg, LabelMap.default(4), "<x>", "detrkit")
    assert adopt_model_config(weights, 3).denoising.labelbook_size is None
    assert adopt_model_config(weights, None).denoising.labelbook_size == 10


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.transformer.dec_layers=5", "model.transformer.dec_layers"),
        ("model.backbone.name=resnet34", "model.backbone.name"),
        ("model.queries.num_patterns=2", "model.queries.num_patterns"),
    ],
)
def test_an_architecture_mismatch_is_one_error_naming_the_field(override, field):
    _, weights = _source("test_dino_tiny")
    target = apply_overrides(weights.config, [override]).model
    with pytest.raises(ConfigError, match=rf"^{field}: the weights of <test_dino_tiny>"):
        check_architecture(weights, target)
    check_architecture(weights, apply_overrides(weights.config, ["model.num_classes=2"]).model)


def test_weights_that_do_not_fit_name_the_tensors():
    _, weights = _source("test_detr_tiny")
    model, _ = _with_classes(weights, weights.model.num_classes)
    key = next(k for k, v in weights.state.items() if "decoder" in k and v.dim() == 2)
    broken = dict(weights.state)
    broken[key] = broken[key][:3]
    with pytest.raises(ConfigError, match=rf"other shapes for 1 \({key}"):
        transfer_weights(model, dataclasses.replace(weights, state=broken))
    del broken[key]
    with pytest.raises(ConfigError, match="missing 1"):
        transfer_weights(model, dataclasses.replace(weights, state=broken))


@pytest.mark.parametrize("preset", ["test_detr_tiny", "test_dab_detr_tiny", "test_dino_tiny"])
def test_another_query_count_reinitialises_only_the_per_query_embeddings(preset):
    _, weights = _source(preset)
    cfg = apply_overrides(
        weights.config, ["model.queries.num_queries=12", "postprocess.num_select=null"]
    )
    model = build_model(cfg).eval()
    check_architecture(weights, cfg.model)
    report = transfer_weights(model, weights)
    per_query = set(model.query_dependent_keys())
    assert per_query and set(report.reinitialised) == per_query
    for key in per_query:
        assert model.state_dict()[key].shape[0] == 12
