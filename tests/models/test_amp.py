"""Mixed precision inside the model: under ``torch.autocast`` the backbone and the transformer's
linear layers / attention matmuls run in bfloat16, while the coordinate arithmetic (deformable
sampling, reference points, box refinement, proposals, sine embeddings of boxes) runs in the
float32 islands of :mod:`detrkit.ops.precision`.

The training loop casts the model outputs to float32 before the criterion, so a loop-level test
passes even when autocast does nothing; these tests look inside the forward instead.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detrkit.ops.msda.module as msda_module
import detrkit.ops.msda.sparse as msda_sparse
from detrkit.config import apply_overrides
from detrkit.criterion.set_loss import build_criterion
from detrkit.engine.loop import to_float32
from detrkit.models import build_model
from detrkit.ops.msda import MSDeformAttn
from detrkit.presets import get_preset, list_presets
from detrkit.structures import DetectorOutput, Target

BF16 = torch.bfloat16
GLOBAL = ["test_detr_tiny", "test_dab_detr_tiny"]
DEFORMABLE = ["test_deformable_detr_tiny", "test_dab_deformable_detr_tiny"]
# two-stage and mixed query selection pick their queries with a top-k over scores; in bf16 close
# scores swap, so their outputs are compared for dtypes and finiteness only, not for values
SELECTING = ["test_deformable_detr_tiny_two_stage", "test_dino_tiny"]

# |bf16 - fp32| over every output layer (final + aux) for the batch of _inputs, weights
# perturbed by 0.05 * N(0, 1), measured on this CPU (native bf16) over seeds 0-11 (the test
# uses seed 0), as max / mean of the absolute error:
#   logits: max 0.015-0.116, mean 0.004-0.030 (logits reach ~7; one bf16 ulp there is 0.03:
#           the 0.116 is the DAB-Deformable tail, seed 0 gives 0.034)
#   boxes:  max 0.0004-0.0030, mean 0.0001-0.00045 with the float32 islands. Without them
#           (bf16 reference points and box sigmoids) DETR / Deformable DETR boxes were off by
#           max 0.0022-0.0070, mean 0.0006-0.0010 (seed 0: mean 0.0008).
# The bounds cover the worst seed with some room (other CPUs round differently) while the
# mean box error still catches half-precision boxes.
LOGITS_ATOL, LOGITS_MEAN = 0.15, 0.04
BOXES_ATOL, BOXES_MEAN = 4e-3, 6e-4


def test_presets_used_here_exist():
    names = set(list_presets())
    assert {*GLOBAL, *DEFORMABLE, *SELECTING} <= names


def _config(name: str, *overrides: str):
    return apply_overrides(get_preset(name), list(overrides)).validate()


def _build(name: str, *overrides: str, seed: int = 0) -> nn.Module:
    """The tiny preset with every transformer weight perturbed (the official initialisation
    zeroes the last box layer, which would make the boxes equal to the references)."""
    torch.manual_seed(seed)
    model = build_model(_config(name, *overrides))
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@cache
def _model(name: str) -> nn.Module:
    return _build(name)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 48x64 images, the second one 40x48 in a padded batch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 48, 64, generator=g)
    mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[1, :, 48:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def _bf16(model: nn.Module, *args) -> DetectorOutput:
    with torch.autocast("cpu", dtype=BF16):
        return model(*args)


def _layers(out: DetectorOutput):
    return [*out.aux, out.final]


@pytest.mark.parametrize("name", GLOBAL + DEFORMABLE)
def test_bf16_forward_matches_float32(name):
    model, (images, mask) = _model(name), _inputs()
    with torch.no_grad():
        ref = model(images, mask)
        out = _bf16(model, images, mask)
    assert out.logits.dtype == BF16  # the class head ran under autocast
    assert ref.logits.dtype == ref.boxes.dtype == torch.float32
    for got, want in zip(_layers(out), _layers(ref), strict=True):
        logits_err = (got.logits.float() - want.logits).abs()
        boxes_err = (got.boxes.float() - want.boxes).abs()
        assert logits_err.max() > 0  # equal outputs: autocast did nothing
        assert logits_err.max() <= LOGITS_ATOL and logits_err.mean() <= LOGITS_MEAN
        assert boxes_err.max() <= BOXES_ATOL and boxes_err.mean() <= BOXES_MEAN


def _heavy_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Backbone convolutions and stages, neck convolutions, every transformer linear layer and
    attention, except the 2-wide reference-point projection (a float32 island by design)."""
    heavy = {}
    for name, module in model.named_modules():
        conv = name.startswith(("backbone", "neck")) and isinstance(module, nn.Conv2d)
        stage = name.startswith("backbone.body.layer") and name.count(".") == 2  # after its BNs
        linear = name.startswith("transformer") and isinstance(
            module, (nn.Linear, nn.MultiheadAttention)
        )
        if conv or stage or (linear and name != "transformer.queries.reference_points"):
            heavy[name] = module
    return heavy


@pytest.mark.parametrize("name", [*GLOBAL, *DEFORMABLE, "test_dino_tiny"])
def test_heavy_layers_run_in_bf16(name):
    model, (images, mask) = _model(name), _inputs()
    dtypes: dict[str, torch.dtype] = {}

    def record(key):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            dtypes.setdefault(key, first.dtype)

        return hook

    heavy = _heavy_layers(model)
    handles = [m.register_forward_hook(record(k)) for k, m in heavy.items()]
    try:
        with torch.no_grad():
            _bf16(model, images, mask)
    finally:
        for h in handles:
            h.remove()
    kinds = {type(heavy[k]).__name__ for k in dtypes}
    assert {"Conv2d", "Linear", "Sequential"} <= kinds, kinds
    if name == "test_detr_tiny":  # torch's attention (the other presets: their own matmuls)
        assert "MultiheadAttention" in kinds
    not_bf16 = {k: v for k, v in dtypes.items() if v != BF16}
    assert not not_bf16
    assert len(dtypes) >= 30


class _Spy:
    """Records what the deformable sampling op receives and computes."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        self.grids: list[tuple[torch.dtype, torch.dtype]] = []
        op, grid_sample, csr = msda_module.ms_deform_attn, F.grid_sample, msda_sparse._csr

        def spy_op(value, shapes, starts, locations, weights, backend="auto"):
            out = op(value, shapes, starts, locations, weights, backend=backend)
            self.calls.append(
                {
                    "dtypes": {value.dtype, locations.dtype, weights.dtype, out.dtype},
                    "autocast": torch.is_autocast_enabled("cpu"),
                    "finite": bool(locations.isfinite().all() and out.isfinite().all()),
                    "max_loc": locations.detach().abs().max().item(),
                }
            )
            return out

        def spy_grid_sample(value, grid, *args, **kwargs):
            self.grids.append((value.dtype, grid.dtype))
            return grid_sample(value, grid, *args, **kwargs)

        def spy_csr(crow, col, values, size):  # the sparse backend's sampling matrix
            self.grids.append((values.dtype, values.dtype))
            return csr(crow, col, values, size)

        monkeypatch.setattr(msda_module, "ms_deform_attn", spy_op)
        monkeypatch.setattr(F, "grid_sample", spy_grid_sample)
        monkeypatch.setattr(msda_sparse, "_csr", spy_csr)


def _references(model: nn.Module) -> tuple[list, list]:
    """Hooks collecting the decoder's references and the reference points that every
    deformable attention receives."""
    refs, points = [], []
    model.transformer.decoder.register_forward_hook(lambda m, a, out: refs.extend(out.references))
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.register_forward_pre_hook(lambda m, args: points.append(args[1]))
    return refs, points


def _finite_float32(tensors) -> None:
    for t in tensors:
        assert t.dtype == torch.float32 and t.isfinite().all()


@pytest.mark.parametrize("name", DEFORMABLE + SELECTING)
def test_float32_islands_hold(name, monkeypatch):
    model = _build(name)  # a fresh model: hooks stay on it
    spy = _Spy(monkeypatch)
    refs, points = _references(model)
    with torch.no_grad():
        out = _bf16(model, *_inputs())
    # the sampling op: float32 locations, weights, values and result, autocast off inside
    assert spy.calls and spy.grids
    assert all(c["dtypes"] == {torch.float32} and not c["autocast"] for c in spy.calls)
    # bilinear sampling (grid_sample, or the sparse backend's weights)
    assert set(spy.grids) == {(torch.float32, torch.float32)}
    # reference points / boxes of every layer and the predicted boxes
    _finite_float32(r for r in refs if r is not None)
    assert len(points) == len(spy.calls)
    _finite_float32(points)
    _finite_float32(layer.boxes for layer in _layers(out))
    if out.enc is not None:  # proposals: anchors and refined boxes
        _finite_float32([out.enc.boxes, out.enc.anchors])
    assert out.logits.dtype == BF16


def _large_offsets(model: nn.Module, scale: float) -> nn.Module:
    """Sampling offsets of ``scale`` pixels in every direction, sharp attention logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MSDeformAttn):
                bias = module.sampling_offsets.bias
                bias.copy_(scale * torch.randn(bias.shape, generator=g))
                module.sampling_offsets.weight.mul_(scale / 10)
                module.attention_weights.weight.mul_(100.0)
    return model


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("test_deformable_detr_tiny", "reference"),
        ("test_deformable_detr_tiny", "gather"),
        ("test_dino_tiny", "reference"),
    ],
)
def test_large_offsets_stay_finite_in_bf16(name, backend, monkeypatch):
    model = _large_offsets(_build(name, f"model.transformer.msda_backend={backend}"), 1e4)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        out = _bf16(model, *_inputs())
    assert spy.calls and all(c["finite"] for c in spy.calls)
    assert max(c["max_loc"] for c in spy.calls) > 100  # far outside every map
    for layer in _layers(out):
        assert layer.logits.isfinite().all() and layer.boxes.isfinite().all()
        assert layer.boxes.dtype == torch.float32


def _targets() -> list[Target]:
    g = torch.Generator().manual_seed(3)

    def boxes(n):
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        return torch.cat([centre, size], -1)

    return [
        Target(boxes(3), torch.tensor([0, 2, 3])),
        Target(boxes(1), torch.tensor([1])),
    ]


def test_dino_bf16_training_step_has_finite_loss_and_gradients():
    name = "test_dino_tiny"
    model = _build(name).train()
    criterion = build_criterion(_config(name))
    targets = _targets()
    images, mask = _inputs()
    torch.manual_seed(0)  # the denoising queries are drawn from the global generator
    out = _bf16(model, images, mask, targets)
    assert out.dn is not None and out.dn.meta.pad_size > 0  # denoising is on
    assert out.logits.dtype == BF16
    _finite_float32([out.boxes, *(layer.boxes for layer in out.dn.layers)])
    losses = criterion(to_float32(out), targets)  # as the training loop calls it
    assert losses.total.dtype == torch.float32 and losses.total.isfinite()
    assert any(k.endswith("_dn") for k in losses.terms)
    losses.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing
    bad = [n for n, g in grads.items() if g.dtype != torch.float32 or not g.isfinite().all()]
    assert not bad
    # the gradient reaches the sampling offsets through the float32 island
    offsets = model.transformer.decoder.layers[0].cross_attn.sampling_offsets.weight
    assert offsets.grad.abs().sum() > 0
