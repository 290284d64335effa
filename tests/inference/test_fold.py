"""Inference-time folding: frozen batch norm merged into the convolutions, channels_last, and the
Detector's inference view. Every folded model must give the unfolded model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detrkit.api import Detector
from detrkit.inference.fold import fold_frozen_batchnorm, inference_model
from detrkit.models import build_model
from detrkit.models.backbone import FrozenBatchNorm2d, ResNetBackbone
from detrkit.presets import get_preset
from tests.conftest import TINY_PRESETS, padded_batch


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine terms (fresh ones are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _norms(module: nn.Module) -> int:
    return sum(isinstance(m, FrozenBatchNorm2d) for m in module.modules())


def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float rounding, relative to the tensor's scale."""
    scale = expected.abs().max().clamp(min=1.0)
    assert (got - expected).abs().max() <= tol * scale


@pytest.mark.parametrize(("name", "dilation"), [("resnet18", False), ("resnet50", True)])
def test_folded_backbone_equals_the_unfolded(name, dilation):
    torch.manual_seed(0)
    backbone = ResNetBackbone(name, (1, 2, 3, 4), dilation=dilation).eval()
    _randomise_norms(backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    folded = fold_frozen_batchnorm(backbone)
    assert _norms(backbone) > 0 and _norms(folded) == 0  # every one had a partner conv
    images, mask = padded_batch([(64, 96), (48, 64)])
    with torch.no_grad():
        expected, expected_masks = backbone(images, mask)
        got, got_masks = folded(images, mask)
    for g, e in zip(got, expected, strict=True):
        _close(g, e)
    for g, e in zip(got_masks, expected_masks, strict=True):
        assert torch.equal(g, e)
    after = backbone.state_dict()  # the input module is not changed
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_norm_without_a_convolution_before_it_is_kept():
    norm = FrozenBatchNorm2d(4)
    _randomise_norms(norm)
    net = nn.Sequential(nn.ReLU(), norm)
    folded = fold_frozen_batchnorm(net)
    assert isinstance(folded[1], FrozenBatchNorm2d)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(folded(x), net(x))


@pytest.mark.parametrize(
    ("name", "channels_last"),
    [(name, True) for name in TINY_PRESETS] + [("test_deformable_detr_tiny", False)],
)
def test_inference_model_equals_the_model(name, channels_last):
    torch.manual_seed(0)
    model = build_model(get_preset(name)).eval()
    _randomise_norms(model.backbone)
    view = inference_model(model, channels_last=channels_last)
    assert _norms(view) == 0 and _norms(model) > 0
    assert view.transformer is model.transformer and view.neck is model.neck  # shared
    if channels_last:
        conv = next(m for m in view.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, mask = padded_batch([(64, 96), (48, 64)])
    with torch.no_grad():
        expected, got = model(images, mask), view(images, mask)
    _close(got.logits, expected.logits, 1e-4)
    _close(got.boxes, expected.boxes, 1e-4)
    for g, e in zip(got.aux, expected.aux, strict=True):
        _close(g.boxes, e.boxes, 1e-4)


def test_detector_predicts_with_the_view_and_rebuilds_it_on_new_weights():
    torch.manual_seed(0)
    detector = Detector.from_preset("test_detr_tiny", device="cpu")
    _randomise_norms(detector.model.backbone, seed=1)
    image = torch.rand(3, 64, 80)
    first = detector.inference_module()
    assert _norms(first) == 0 and detector.inference_module() is first  # kept while unchanged
    # new weights (an in-place write, as load_state_dict does) give a new view with them
    _randomise_norms(detector.model.backbone, seed=2)
    second = detector.inference_module()
    assert second is not first
    batch = detector._preprocess(image)[None]
    mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        expected, got = detector.model(batch, mask), second(batch, mask)
    _close(got.logits, expected.logits, 1e-4)
    # predict() runs the view: its scores are the unfolded model's
    [pred] = detector.predict(image, threshold=0.0)
    probs = expected.logits.softmax(-1)[0, :, :-1].max(-1).values
    top = probs.sort(descending=True).values[: len(pred)]
    _close(pred.scores.sort(descending=True).values, top, 1e-4)
