"""No silent switch: every value of every model switch, on every tiny preset, either is refused
by ``Config.validate()`` with a line naming the field, or changes the built model (its
parameters, its outputs on a fixed input, or its gradients in a training step)."""

from __future__ import annotations

import dataclasses
import typing
from functools import cache

import pytest
import torch
import torchvision

from detrkit.config import Config, ConfigError, ModelConfig, apply_overrides
from detrkit.criterion import build_criterion
from detrkit.models import build_model
from detrkit.presets import get_preset
from tests.conftest import TINY_PRESETS, random_targets

TINY = TINY_PRESETS
# a backend choice, numerically identical by design (tests/ops compares the backends forward
# and backward); validation refuses any value but "auto" with global attention
EXEMPT = {"model.transformer.msda_backend"}


def _switches(cls: type = ModelConfig, prefix: str = "model") -> dict[str, list]:
    """Every bool / optional bool / Literal field under ``model``, with its values."""
    out: dict[str, list] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}.{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out.update(_switches(tp, key))
        elif tp is bool:
            out[key] = [False, True]
        elif typing.get_origin(tp) is typing.Literal:
            out[key] = list(args)
        elif set(args) == {bool, type(None)}:
            out[key] = [None, False, True]
    return out


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


SWITCHES = _switches()
# every value other than the preset's own
CASES = [
    (p, k, v)
    for p in TINY
    for k, values in SWITCHES.items()
    if k not in EXEMPT
    for v in values
    if _get(get_preset(p), k) != v
]


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images; the second covers a 16 x 16 corner: fewer valid proposals than queries."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=g)
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, 16:, :] = mask[1, :, 16:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def _layout(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names with their shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def _build(cfg: Config, seed: int = 1):
    """The model with seeded, perturbed weights (no zero-initialised layer hides a path)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _flat(out) -> list[torch.Tensor]:
    tensors = [out.logits, out.boxes]
    for layer in out.aux:
        tensors += [layer.logits, layer.boxes]
    if out.enc is not None:
        tensors += [out.enc.logits, out.enc.boxes]
    return tensors


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b)
    )


def _outputs(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flat(model.eval()(*_images()))


def _gradients(model, cfg: Config) -> list[torch.Tensor]:
    targets = random_targets([3, 1], num_classes=cfg.model.num_classes, seed=3)
    torch.manual_seed(1)  # the denoising noise
    loss = build_criterion(cfg)(model.train()(*_images(), targets), targets).total
    # every backbone switch changes the parameters or their values: skip its backward
    params = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")
    ]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@cache
def _reference(preset: str, seed: int = 1):
    cfg = get_preset(preset)
    model = _build(cfg, seed)
    return _layout(cfg), model.state_dict(), _outputs(model), _gradients(model, cfg)


def _behaves_differently(cfg: Config, preset: str, seed: int) -> bool:
    """Outputs or gradients differ from the preset's, both with weights perturbed by ``seed``."""
    _, _, ref_out, ref_grads = _reference(preset, seed)
    model = _build(cfg, seed)
    return not _same(_outputs(model), ref_out) or not _same(_gradients(model, cfg), ref_grads)


@pytest.fixture(autouse=True)
def _offline_imagenet_weights(monkeypatch):
    """``backbone.pretrained=true`` loads random "ImageNet" weights instead of downloading."""

    def fake(self, *args, **kwargs):
        name = self.url.rsplit("/", 1)[-1].split("-")[0]
        torch.manual_seed(7)
        net = getattr(torchvision.models, name)(weights=None)
        return {
            k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in net.state_dict().items()
        }

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake)


def _changed(preset: str, key: str, value) -> Config:
    """The preset with ``key = value`` (softmax / sigmoid with their loss)."""
    cfg = get_preset(preset)
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    sets = [f"{key}={text}"]
    if key == "model.class_activation":
        sets.append(f"loss.class_loss={'ce' if value == 'softmax' else 'focal'}")
        if value == "softmax":
            sets.append("postprocess.num_select=null")
    return apply_overrides(cfg, sets)


@pytest.mark.parametrize("preset,key,value", CASES)
def test_every_switch_is_refused_or_changes_the_model(preset, key, value):
    cfg = _changed(preset, key, value)
    try:
        cfg.validate()
    except ConfigError as err:
        message = str(err)
        assert message.startswith(("model.", "loss.", "postprocess.")) and ":" in message
        assert "\n" not in message
        return
    ref_layout, ref_state, ref_out, ref_grads = _reference(preset)
    if _layout(cfg) != ref_layout:
        return  # other parameters
    model = _build(cfg)
    state = model.state_dict()
    if any(not torch.equal(state[k], ref_state[k]) for k in state):
        return  # other initial values
    if not _same(_outputs(model), ref_out) or not _same(_gradients(model, cfg), ref_grads):
        return
    # a switch whose effect depends on the weights (the ranking of invalid proposals: their
    # score is one constant) gets three more draws before it counts as changing nothing
    assert any(_behaves_differently(cfg, preset, seed) for seed in (2, 3, 4)), (
        f"{key}={value} is accepted on {preset} but changes nothing"
    )


def test_every_switch_is_covered():
    """The parametrisation sees every switch of the config tree (a new field is tested
    automatically) and exempts only the backend choice."""
    assert {
        "model.queries.kind",
        "model.queries.box_update",
        "model.queries.content",
        "model.transformer.attention",
        "model.transformer.conditional_attention",
        "model.denoising.kind",
        "model.heads.share_decoder_box",
        "model.neck.norm",
    } <= set(SWITCHES)
    assert set(SWITCHES) >= EXEMPT and len(EXEMPT) == 1


def test_msda_backend_is_refused_with_global_attention():
    cfg = apply_overrides(
        get_preset("test_detr_tiny"), ["model.transformer.msda_backend=reference"]
    )
    with pytest.raises(
        ConfigError,
        match="model.transformer.msda_backend: does not apply with model.transformer.attention",
    ):
        cfg.validate()


def test_dino_on_single_scale_features_with_global_attention_trains():
    """CDN + mixed query selection + look forward twice on one C5 level with global attention
    (no deformable attention anywhere): a valid model whose loss falls on a fixed batch."""
    cfg = apply_overrides(
        get_preset("test_dino_tiny"),
        [
            "model.transformer.attention=global",
            "model.transformer.num_feature_levels=1",
            "model.queries.num_queries=12",
            "postprocess.num_select=40",
        ],
    ).validate()
    model = _build(cfg).train()
    assert not any("sampling_offsets" in k for k in model.state_dict())
    criterion = build_criterion(cfg)
    images, mask = _images()
    targets = random_targets([3, 1], num_classes=cfg.model.num_classes, seed=3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        out = model(images, mask, targets)
        assert out.dn is not None and out.enc is not None
        loss = criterion(out, targets).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
