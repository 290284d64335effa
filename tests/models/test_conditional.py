"""Single-scale DAB-DETR / DN-DETR: decoder against the official taps, denoising in the model,
edge cases, options, and the official checkpoint converter."""

import warnings
from functools import lru_cache

import pytest
import torch

from detrkit.config import to_dict
from detrkit.convert import load_official
from detrkit.convert.dab_detr import to_official
from detrkit.convert.official import get_converter
from detrkit.losses import build_criterion
from detrkit.losses_denoising import denoising_loss
from detrkit.models import build_model
from detrkit.models.conditional import DABTransformer, box_sine_embedding
from detrkit.models.denoising import DenoisingQueries, build_denoising_groups
from detrkit.models.position import SinePositionEncoding
from detrkit.presets import get_preset
from detrkit.structures import Target
from tests.parity.fixtures import fixture_names, load_fixture

DAB_FIXTURES = [n for n in fixture_names() if load_fixture(n).family in ("dab_detr", "dn_dab_detr")]
DN_FIXTURES = [n for n in DAB_FIXTURES if load_fixture(n).meta.get("train_dn")]


@lru_cache(maxsize=None)
def _official(name):
    fx = load_fixture(name)
    return load_official(fx.state_dict(), official_args=fx.meta["official_args"])


def _levels(model, images, mask):
    """Backbone, neck and position encodings of a Detector (its forward up to the part)."""
    features, masks = model.backbone(images, mask)
    srcs, masks = model.neck(features, masks, mask)
    return srcs, masks, [model.position(m).to(s.dtype) for s, m in zip(srcs, masks)]


def _targets(fx):
    return [Target(boxes=t["boxes"], labels=t["labels"]) for t in fx.targets()]


# ----------------------------------------------------------------------------- official parity


@pytest.mark.parity
@pytest.mark.parametrize("name", DAB_FIXTURES)
def test_decoder_matches_official_taps(name):
    fx = load_fixture(name)
    model = _official(name).model
    t = fx.tensors
    with torch.no_grad():
        hidden, anchors = model.transformer.decode(*_levels(model, t["inputs.images"],
                                                            t["inputs.mask"]))
    torch.testing.assert_close(hidden, t["taps.transformer_return.0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(anchors, t["taps.transformer_return.1"], atol=1e-5, rtol=0)


def _stored_queries(fx, meta):
    t, pad = fx.tensors, fx.meta["train_dn"]["mask_dict"]["pad_size"]
    content = t["train_dn.input_query_label"].transpose(0, 1)  # query-major -> [B, P+Q, d]
    boxes = t["train_dn.input_query_bbox"].transpose(0, 1)
    return DenoisingQueries(content[:, :pad], boxes[:, :pad], t["train_dn.attn_mask"], meta), \
        content[:, pad:], boxes[:, pad:]


def _compare_training_outputs(out, fx):
    t = fx.tensors
    dn_logits = t["train_dn.dn_outputs.pred_logits_all_layers"]
    dn_boxes = t["train_dn.dn_outputs.pred_boxes_all_layers"]
    assert len(out.dn.layers) == dn_logits.shape[0]
    for i, layer in enumerate(out.dn.layers):
        torch.testing.assert_close(layer.logits, dn_logits[i], atol=1e-3, rtol=0)
        torch.testing.assert_close(layer.boxes, dn_boxes[i], atol=2e-4, rtol=0)
    torch.testing.assert_close(out.logits, t["train_dn.outputs.pred_logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(out.boxes, t["train_dn.outputs.pred_boxes"], atol=2e-4, rtol=0)
    for i, aux in enumerate(out.aux):
        torch.testing.assert_close(aux.logits, t[f"train_dn.outputs.aux_outputs.{i}.pred_logits"],
                                   atol=1e-3, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("name", DN_FIXTURES)
def test_injected_denoising_queries_reproduce_training_outputs(name):
    fx = load_fixture(name)
    model = _official(name).model
    args = fx.meta["official_args"]
    meta = build_denoising_groups(_targets(fx), "dn", args["scalar"], 0.0, 0.0,
                                  model.num_classes).meta
    queries, match_content, match_boxes = _stored_queries(fx, meta)
    model.train()
    try:
        with torch.no_grad():
            content, anchors = model.transformer.matching_queries(2)
            out = model.transformer(*_levels(model, fx.tensors["inputs.images"],
                                             fx.tensors["inputs.mask"]), dn_queries=queries)
    finally:
        model.eval()
    assert torch.equal(content, match_content) and torch.equal(anchors, match_boxes)
    _compare_training_outputs(out, fx)


@pytest.mark.parity
@pytest.mark.parametrize("name", DN_FIXTURES)
def test_seeded_training_forward_reproduces_official(name):
    """The model draws its denoising queries with the official sequence of random calls."""
    fx = load_fixture(name)
    model = _official(name).model.train()
    try:
        torch.manual_seed(fx.meta["train_dn"]["dn_seed"])
        with torch.no_grad():
            out = model(fx.tensors["inputs.images"], fx.tensors["inputs.mask"], _targets(fx))
    finally:
        model.eval()
    assert out.dn.meta.pad_size == fx.meta["train_dn"]["mask_dict"]["pad_size"]
    _compare_training_outputs(out, fx)


# ----------------------------------------------------------------------------- behaviour


def test_box_sine_embedding_layout():
    boxes = torch.tensor([[0.1, 0.7, 0.3, 0.2]], dtype=torch.float64)
    emb = box_sine_embedding(boxes, 8)
    assert emb.shape == (1, 32) and emb.dtype == torch.float64
    freq = 10000 ** (2 * (torch.arange(8) // 2) / 8)
    for part, value in enumerate((0.7, 0.1, 0.3, 0.2)):  # y, x, w, h
        pos = value * 2 * torch.pi / freq
        expected = torch.where(torch.arange(8) % 2 == 0, pos.sin(), pos.cos())
        torch.testing.assert_close(emb[0, 8 * part:8 * part + 8], expected.double())


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=64,
                dropout=0.0, num_queries=6, num_classes=3)
    args.update(kw)
    part = DABTransformer(**args)
    with torch.no_grad():  # spread the anchors and make the heads non-trivial
        part.refpoint_embed.weight.normal_(0, 1)
        part.bbox_embed.layers[-1].weight.normal_(0, 0.1)
    src = torch.randn(2, 32, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    return part, [src], [mask], [SinePositionEncoding(16, 20, 20)(mask)]


def _dn_part(counts, dn_number=2, **kw):
    from detrkit.models.denoising import DenoisingSettings

    part, srcs, masks, pos = _tiny(denoising=DenoisingSettings(dn_number, 0.2, 0.4), **kw)
    g = torch.Generator().manual_seed(1)
    targets = [Target(boxes=torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                       torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1),
                      labels=torch.randint(0, 3, (n,), generator=g)) for n in counts]
    return part.train(), srcs, masks, pos, targets


@pytest.mark.parametrize("counts", [[2, 5], [0, 3], [0, 0], [40, 1]])
def test_denoising_queries_do_not_leak_into_matching_outputs(counts):
    """Matching queries never attend to denoising slots: their outputs are those of a forward
    without denoising. Covers an image without boxes, a batch without boxes and very uneven
    counts."""
    part, srcs, masks, pos, targets = _dn_part(counts)
    with_dn = part(srcs, masks, pos, targets)
    without = part(srcs, masks, pos)
    assert without.dn is None and with_dn.dn is not None
    pad = 2 * max(counts)
    assert with_dn.dn.meta.pad_size == pad and len(with_dn.dn.layers) == 3
    assert with_dn.dn.layers[-1].logits.shape == (2, pad, 3)
    assert with_dn.logits.shape == (2, 6, 3)
    torch.testing.assert_close(with_dn.logits, without.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_dn.aux[0].boxes, without.aux[0].boxes, atol=1e-6, rtol=0)


def test_denoising_groups_are_isolated():
    part, srcs, masks, pos, targets = _dn_part([3, 2], dn_number=3)
    queries = part.make_denoising_queries(targets)
    out = part(srcs, masks, pos, dn_queries=queries)
    changed = DenoisingQueries(queries.content.clone(), queries.boxes_unact.clone(),
                               queries.attn_mask, queries.meta)
    changed.content[:, 3:6] += 1.0  # group 1 only
    changed.boxes_unact[:, 3:6] -= 0.5
    out2 = part(srcs, masks, pos, dn_queries=changed)
    a, b = out.dn.layers[-1].logits, out2.dn.layers[-1].logits
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[:, 6:], b[:, 6:], atol=1e-6, rtol=0)
    assert (a[:, 3:6] - b[:, 3:6]).abs().max() > 1e-3
    torch.testing.assert_close(out.logits, out2.logits, atol=1e-6, rtol=0)


def test_no_denoising_in_eval_or_without_targets():
    part, srcs, masks, pos, targets = _dn_part([2, 1])
    assert part.eval()(srcs, masks, pos, targets).dn is None
    assert part.train()(srcs, masks, pos, None).dn is None


def test_patterns_multiply_the_queries():
    part, srcs, masks, pos = _tiny(num_patterns=3)
    out = part.eval()(srcs, masks, pos)
    assert out.logits.shape == (2, 18, 3)
    # the same anchor with different patterns gives different predictions
    assert (out.logits[:, :6] - out.logits[:, 6:12]).abs().max() > 1e-4
    part, srcs, masks, pos, targets = _dn_part([2, 3], num_patterns=2)
    out = part(srcs, masks, pos, targets)
    assert out.logits.shape == (2, 12, 3) and out.dn.meta.pad_size == 6


def test_random_fixed_anchor_centres():
    part, srcs, masks, pos = _tiny(random_refpoints_xy=True)
    xy = part.refpoint_embed.weight[:, :2]
    assert xy.abs().max() <= 7.0  # inverse_sigmoid of uniform(0, 1), clamped at 1e-3
    part.train()(srcs, masks, pos).boxes.sum().backward()
    grad = part.refpoint_embed.weight.grad
    assert not grad[:, :2].any() and grad[:, 2:].abs().sum() > 0


def test_without_width_height_modulation():
    part, srcs, masks, pos = _tiny(modulate_hw_attn=False)
    assert part.decoder.ref_anchor_head is None
    assert "decoder.ref_anchor_head.layers.0.weight" not in part.state_dict()
    out = part.eval()(srcs, masks, pos)
    assert torch.isfinite(out.logits).all()


def test_first_layer_only_has_the_query_position_projection():
    part, *_ = _tiny()
    keys = part.state_dict()
    assert "decoder.layers.0.ca_qpos_proj.weight" in keys
    assert not any(k.startswith("decoder.layers.1.ca_qpos_proj") for k in keys)


def test_padding_does_not_change_the_outputs():
    part, srcs, masks, pos = _tiny()
    part.eval()
    big = torch.randn(1, 32, 4, 7) * 5
    big[..., :5] = srcs[0][:1]
    mask = torch.zeros(1, 4, 7, dtype=torch.bool)
    mask[..., 5:] = True
    enc = SinePositionEncoding(16, 20, 20)
    alone = part([srcs[0][:1]], [masks[0][:1]], [pos[0][:1]])
    padded = part([big], [mask], [enc(mask)])
    torch.testing.assert_close(alone.logits, padded.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["test_dab_detr_tiny", "test_dn_detr_tiny"])
def test_tiny_preset_training_step(name):
    """Forward with targets, matching + denoising loss, backward: every trainable parameter
    gets a finite gradient (label embedding included for DN-DETR)."""
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    targets = [Target(boxes=torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.3, 0.6, 0.2, 0.2]]),
                      labels=torch.tensor([1, 3])),
               Target(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    out = model(images, mask, targets)
    dn = out.dn
    out.dn = None  # the matching criterion; the denoising loss is added separately
    loss = criterion(out, targets).total
    if cfg.model.denoising.kind == "dn":
        assert dn is not None and dn.meta.pad_size == 2 * cfg.model.denoising.dn_number
        loss = loss + denoising_loss(dn, 2.0, cfg.loss.class_weight, cfg.loss.bbox_weight,
                                     cfg.loss.giou_weight).total
    else:
        assert dn is None
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if dn is not None:
        assert grads["transformer.label_enc.weight"][[1, 3]].abs().sum() > 0


def test_full_size_presets_build():
    for name, dn in (("dab_detr_r50", False), ("dn_detr_r50", True)):
        with torch.device("meta"):
            model = build_model(get_preset(name))
        part = model.transformer
        assert isinstance(part, DABTransformer)
        assert part.refpoint_embed.weight.shape == (300, 4)
        assert (part.label_enc is not None) == dn
        assert len(part.encoder.layers) == len(part.decoder.layers) == 6


# ----------------------------------------------------------------------------- converter


@pytest.mark.parity
@pytest.mark.parametrize("name", DAB_FIXTURES)
def test_to_official_round_trip(name):
    fx = load_fixture(name)
    converted = _official(name)
    official = to_official(converted.model.state_dict(), converted.config)
    state = fx.state_dict()
    assert set(official) == set(state)
    assert all(torch.equal(official[k], state[k]) for k in state)


@pytest.mark.parity
@pytest.mark.parametrize("name", DAB_FIXTURES)
def test_shape_inference(name):
    """Only what the weights cannot tell is passed; the rest is inferred: same config."""
    fx = load_fixture(name)
    args = fx.meta["official_args"]
    keep = ("nheads", "dilation", "num_select", "scalar")  # scalar: DN-DETR's group count
    converter, state = get_converter(fx.family), fx.state_dict()
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
