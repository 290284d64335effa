"""DAB-Deformable-DETR and DN-Deformable-DETR: anchor decoder, denoising in training, presets
and the official-checkpoint converter."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from detrkit.config import ConfigError
from detrkit.convert import dab_deformable_detr as conv
from detrkit.convert import dino as dino_conv
from detrkit.convert.keymap import ConversionError
from detrkit.convert.official import detect_family, from_official, official_to_config
from detrkit.losses import build_criterion
from detrkit.losses_denoising import denoising_loss
from detrkit.models import build_model
from detrkit.models.anchor_decoder import anchor_sine_embedding
from detrkit.models.anchor_transformer import AnchorDeformableTransformer
from detrkit.presets import get_preset
from detrkit.structures import Target
from tests.models.test_deformable import levels_input, padded_batch
from tests.parity.fixtures import fixture_names, fixtures_dir, load_fixture

TINY_PRESETS = ["test_dab_deformable_detr_tiny", "test_dn_deformable_detr_tiny", "test_dino_tiny",
                "test_dino_tiny_5scale"]
SHAPES = [(6, 6), (3, 3), (2, 2), (1, 1)]


def anchor_part(**kw) -> AnchorDeformableTransformer:
    """A small anchor transformer part (d = 32, 3 decoder layers) with perturbed weights."""
    torch.manual_seed(0)
    args = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3, dim_feedforward=32,
                num_feature_levels=4, num_queries=8, num_classes=5, query_kind="anchors",
                box_update="refine", query_scale=True, decoder_norm=False,
                msda_backend="reference")
    args.update(kw)
    part = AnchorDeformableTransformer(**args)  # type: ignore[arg-type]
    with torch.no_grad():  # break the symmetric initialisation so that every path matters
        for p in part.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return part.eval()


def random_targets(counts: list[int], num_classes: int = 4, seed: int = 0) -> list[Target]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append(Target(torch.cat([centre, size], 1),
                          torch.randint(0, num_classes, (n,), generator=g)))
    return out


# ----------------------------------------------------------------------------- presets


def test_presets_follow_the_official_recipes() -> None:
    dab, dn = get_preset("dab_deformable_detr_r50"), get_preset("dn_deformable_detr_r50")
    for cfg in (dab, dn):
        m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
        assert (q.kind, q.box_update, q.num_queries) == ("anchors", "refine", 300)
        assert (t.decoder_query_scale, t.decoder_norm, t.dim_feedforward, t.dropout) == \
            (True, False, 2048, 0.0)
        assert (m.position.offset, m.position.temperature_h) == (0.5, 10000.0)
        assert (cfg.loss.class_weight, cfg.loss.matcher.cost_class) == (1.0, 2.0)
        assert cfg.postprocess.num_select == 100
        assert (cfg.train.epochs, cfg.train.lr_drop, cfg.train.lr_linear_proj_mult) == (50, 40, 1.0)
    assert dab.model.denoising.kind == "none"
    d = dn.model.denoising
    assert (d.kind, d.dn_number, d.label_noise_ratio, d.box_noise_scale, d.content_indicator) == \
        ("dn", 5, 0.2, 0.4, True)


@pytest.mark.parametrize("name,official", [("dab_deformable_detr_r50", 47_512_234),
                                           ("dn_deformable_detr_r50", 47_535_394),
                                           ("dino_4scale_r50", 46_999_422),
                                           ("dino_5scale_r50", 47_362_046)])
def test_full_size_presets_have_the_official_parameter_count(name: str, official: int) -> None:
    with torch.device("meta"):
        model = build_model(get_preset(name))
    # unique tensors of the official models (keys_full_size.json)
    assert sum(v.numel() for v in model.state_dict().values()) == official


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_trains_with_denoising(name: str) -> None:
    """Training-mode forward with targets (denoising active where configured), the full loss
    (matching terms + denoising terms), backward: every parameter gets a finite gradient."""
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).train()
    images, mask = padded_batch([(64, 48), (48, 64)])
    targets = random_targets([3, 1], cfg.model.num_classes)
    out = model(images, mask, targets)
    q = cfg.model.queries.num_queries
    assert out.logits.shape == (2, q, cfg.model.num_classes) and out.boxes.shape == (2, q, 4)
    assert len(out.aux) == cfg.model.transformer.dec_layers - 1
    assert (out.enc is not None) == (cfg.model.queries.kind == "mixed")
    assert (out.dn is not None) == (cfg.model.denoising.kind != "none")
    if out.dn is not None:
        assert out.dn.meta.kind == cfg.model.denoising.kind
        assert out.dn.layers[-1].logits.shape[:2] == (2, out.dn.meta.pad_size) > (2, 0)
    loss = build_criterion(cfg)(out, targets)  # matching terms + denoising terms
    assert any(k.startswith("tgt_") or "_dn" in k for k in loss.terms) == (out.dn is not None)
    loss.total.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def matching_num_boxes(targets: list[Target]) -> float:
    return float(max(sum(len(t) for t in targets), 1))


# ----------------------------------------------------------------------------- anchor decoder


def test_anchor_sine_embedding_layout() -> None:
    boxes = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    emb = anchor_sine_embedding(boxes, 16)
    assert emb.shape == (1, 64)
    # order (y, x, w, h); within a coordinate sin / cos alternate over frequency pairs
    for block, coord in enumerate([1, 0, 2, 3]):
        value = boxes[0, coord] * 2 * math.pi
        for k in (0, 5):
            freq = 10000 ** (2 * (k // 2) / 16)
            expected = math.sin(value / freq) if k % 2 == 0 else math.cos(value / freq)
            assert emb[0, 16 * block + k].item() == pytest.approx(expected, abs=1e-6)
    assert anchor_sine_embedding(boxes[:, :2], 16).shape == (1, 32)


def test_anchors_are_refined_layer_by_layer_and_detached() -> None:
    part = anchor_part()
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(refs=out[1]))
    out = part(srcs, masks, pos)
    refs = captured["refs"]
    assert len(refs) == 4 and all(r.shape == (1, 8, 4) for r in refs)
    torch.testing.assert_close(refs[0], part.refpoint_embed.weight.sigmoid()[None])
    assert not any(r.requires_grad for r in refs[1:])
    # without a decoder norm, layer i's boxes are the anchor after layer i
    for i, layer in enumerate([*out.aux, out.final]):
        torch.testing.assert_close(layer.boxes, refs[i + 1])
    out.boxes.sum().backward()  # the last layer's boxes do not reach earlier box heads
    assert part.bbox_embed[0].layers[0].weight.grad is None
    assert part.bbox_embed[2].layers[0].weight.grad is not None


def test_query_scale_starts_at_the_second_layer() -> None:
    """Zeroing query_scale removes the positional query of layers >= 1 only."""
    part = anchor_part()
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    seen = []
    for layer in part.decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(args[1].detach().clone()))
    with torch.no_grad():
        for p in part.decoder.query_scale.parameters():
            p.zero_()
        part(srcs, masks, pos)
    assert seen[0].abs().sum() > 0
    assert all(s.abs().sum() == 0 for s in seen[1:])
    assert anchor_part(query_scale=False).decoder.query_scale is None


def test_patterns_repeat_every_anchor() -> None:
    part = anchor_part(num_patterns=3)
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(refs=out[1]))
    with torch.no_grad():
        out = part(srcs, masks, pos)
    assert out.logits.shape == (1, 24, 5) and part.patterns_embed.weight.shape == (3, 32)
    first = captured["refs"][0][0]  # [24, 4] pattern-major
    torch.testing.assert_close(first[:8], first[8:16])
    assert not torch.allclose(out.logits[0, :8], out.logits[0, 8:16])


# ----------------------------------------------------------------------------- denoising


@pytest.mark.parametrize("kind,counts", [("dn", [2, 0]), ("dn", [0, 0]), ("dn", [9, 1]),
                                         ("cdn", [0, 2]), ("cdn", [0, 0]), ("cdn", [1, 9])])
def test_denoising_edge_cases(kind: str, counts: list[int]) -> None:
    """Images without boxes, a batch without boxes, very different counts, more boxes than
    dn_number: the denoising queries never leak into the matching queries (same outputs as
    without denoising) and the denoising loss trains."""
    indicator = kind == "dn"
    part = anchor_part(denoising=kind, content_indicator=indicator,
                       query_kind="anchors" if kind == "dn" else "mixed",
                       box_update="refine" if kind == "dn" else "look_forward_twice",
                       decoder_norm=kind == "cdn", dropout=0.0)
    part.denoising_settings = type(part.denoising_settings)(3, 0.5, 0.4)
    assert part.label_enc.weight.shape == (6, 31 if indicator else 32)
    srcs, masks, pos = levels_input(SHAPES, SHAPES, batch=2, d=32)
    targets = random_targets(counts, num_classes=5, seed=1)
    part.train()
    out = part(srcs, masks, pos, targets)
    with torch.no_grad():
        plain = part.eval()(srcs, masks, pos, targets)
    assert plain.dn is None
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.boxes, plain.boxes, atol=1e-6, rtol=1e-5)
    meta = out.dn.meta
    groups = 3 if kind == "dn" else (1 if max(counts) == 0 else 6)  # cdn: official budget rule
    assert meta.num_groups == groups
    assert meta.pad_size == max(counts) * groups * (2 if kind == "cdn" else 1)
    assert meta.num_entries == sum(counts) * groups
    assert out.dn.layers[-1].logits.shape == (2, meta.pad_size, 5)
    loss = denoising_loss(out.dn, matching_num_boxes(targets))
    assert all(torch.isfinite(v) for v in loss.terms.values())
    (loss.total + out.logits.sum() * 0).backward()
    assert part.label_enc.weight.grad is not None  # in the graph even without targets
    if meta.num_entries:
        assert part.label_enc.weight.grad.abs().sum() > 0


def test_dn_content_carries_the_indicator() -> None:
    part = anchor_part(denoising="dn", content_indicator=True, dropout=0.0).train()
    srcs, masks, pos = levels_input(SHAPES, SHAPES, batch=2, d=32)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(tgt=args[0]))
    out = part(srcs, masks, pos, random_targets([2, 1], 5))
    tgt, meta = captured["tgt"], out.dn.meta
    assert (tgt[:, meta.pad_size:, -1] == 0).all()  # matching queries: indicator 0
    assert (tgt[meta.batch_index, meta.slot_index, -1] == 1).all()  # denoising copies: 1
    torch.testing.assert_close(tgt[:, meta.pad_size:, :-1],
                               part.tgt_embed.weight[None].expand(2, -1, -1))


# ----------------------------------------------------------------------------- conversion


def full_size_models() -> dict[str, dict]:
    path = fixtures_dir() / "keys_full_size.json"
    if not path.is_file():
        return {}
    models = json.loads(path.read_text())["models"]
    return {k: v for k, v in models.items()
            if v["family"] in ("dab_deformable_detr", "dn_deformable_detr", "dino")}


@pytest.mark.parametrize("name", sorted(full_size_models()) or
                         [pytest.param("none", marks=pytest.mark.skip("no keys_full_size.json"))])
def test_full_size_official_keys_map_completely(name: str) -> None:
    spec = full_size_models()[name]
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, v in spec["keys"].items():  # distinct values, except where the model shares
        state[key] = torch.rand(v["shape"], generator=g) if v["shape"] else torch.rand(())
    for canonical, aliases in spec["alias_groups"].items():
        for alias in aliases:
            state[alias] = state[canonical]
    assert detect_family(state) == spec["family"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = official_to_config({}, state)  # everything from the key set and shapes
    cfg = official_to_config(spec["config"], state)
    assert inferred.model == cfg.model
    preset = {"dab_deformable_detr": "dab_deformable_detr_r50",
              "dn_deformable_detr": "dn_deformable_detr_r50"}.get(spec["family"], name)
    expected = get_preset(preset).model
    expected.queries.select_valid_proposals = cfg.model.queries.select_valid_proposals
    assert cfg.model == expected
    with torch.device("meta"):
        model = build_model(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    module = dino_conv if spec["family"] == "dino" else conv
    mapped, unmatched = module.from_official(state, cfg)
    assert unmatched == [] and set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == own[k] for k in own)
    back = module.to_official(mapped, cfg)
    assert set(back) == set(state)


def official_args(levels: int, denoising: bool, patterns: int = 0) -> dict:
    args = {"backbone": "resnet18", "dilation": False, "hidden_dim": 64, "nheads": 4,
            "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 32, "num_queries": 10,
            "num_feature_levels": levels, "enc_n_points": 2, "dec_n_points": 3,
            "two_stage": False, "position_embedding": "sine", "num_patterns": patterns,
            "dataset_file": "coco", "num_classes_override": 5, "dropout": 0.0,
            "modelname": "dn_dab_deformable_detr" if denoising else "dab_deformable_detr"}
    if denoising:
        args.update(use_dn=True, scalar=4, label_noise_scale=0.3, box_noise_scale=0.5)
    return args


@pytest.mark.parametrize("levels,denoising,patterns", [(1, False, 0), (3, True, 0),
                                                       (4, False, 2), (5, True, 0)])
def test_every_official_configuration_round_trips(levels: int, denoising: bool,
                                                  patterns: int) -> None:
    args = official_args(levels, denoising, patterns)
    cfg = official_to_config(args)
    q, t, d = cfg.model.queries, cfg.model.transformer, cfg.model.denoising
    assert (t.num_feature_levels, t.enc_n_points, t.dec_n_points) == (levels, 2, 3)
    assert (q.num_patterns, d.kind, d.content_indicator) == \
        (patterns, "dn" if denoising else "none", denoising)
    if denoising:
        assert (d.dn_number, d.label_noise_ratio, d.box_noise_scale) == (4, 0.3, 0.5)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    official = conv.to_official(model.state_dict(), cfg)
    assert ("label_enc.weight" in official) == denoising
    assert official["tgt_embed.weight"].shape == (10, 63 if denoising else 64)
    assert "transformer.decoder.bbox_embed.1.layers.0.weight" in official
    assert ("patterns_embed.weight" in official) == bool(patterns)
    with warnings.catch_warnings():  # shapes alone + what no weight reveals
        warnings.simplefilter("ignore")
        inferred = official_to_config({"nheads": 4, "dropout": 0.0}, official)
    inferred.model.denoising = cfg.model.denoising  # noise settings are not in the weights
    assert inferred.model == cfg.model
    loaded = from_official(official, args)
    images, mask = padded_batch([(96, 80), (64, 96)])
    with torch.no_grad():
        a, b = model(images, mask), loaded(images, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)


def test_conversion_errors_are_explicit() -> None:
    with pytest.raises(ConversionError, match="two_stage"):
        official_to_config({**official_args(4, False), "two_stage": True})
    with pytest.raises(ConversionError, match="num_patterns"):
        official_to_config(official_args(4, True, patterns=2))
    with pytest.raises(ConversionError, match="num_feature_levels=2"):
        official_to_config(official_args(2, False))
    args = official_args(4, False)
    cfg = official_to_config(args)
    official = conv.to_official(build_model(cfg).state_dict(), cfg)
    official["transformer.decoder.bbox_embed.1.layers.0.bias"] = \
        official["bbox_embed.1.layers.0.bias"] + 1
    with pytest.raises(ConversionError, match="same tensor"):
        from_official(official, args)
    bad = get_preset("dab_deformable_detr_r50")
    bad.model.denoising.kind = "cdn"
    bad.model.queries.kind = "reference_points"
    with pytest.raises(ConfigError, match="model.denoising.kind"):
        bad.validate()


# ----------------------------------------------------------------------------- parity


ANCHOR_FIXTURES = [n for n in fixture_names()
                   if load_fixture(n).family in ("dab_deformable_detr", "dn_deformable_detr")]


@pytest.mark.parity
@pytest.mark.parametrize("name", ANCHOR_FIXTURES)
def test_fixture_taps(name: str) -> None:
    """The decoder internals match the official transformer's return values (float32)."""
    fx = load_fixture(name)
    t = fx.tensors
    model = from_official(fx.state_dict(), fx.meta["official_args"])
    captured = {}
    model.transformer.decoder.register_forward_hook(
        lambda mod, args, out: captured.update(hidden=out[0], refs=out[1]))
    with torch.no_grad():
        model(t["inputs.images"], t["inputs.mask"])
    taps = fx.group("taps.transformer_return")
    torch.testing.assert_close(captured["hidden"], taps["0"], atol=1e-4, rtol=0)
    initial = taps["1"] if taps["1"].dim() == 3 else taps["1"][None].expand(2, -1, -1)
    torch.testing.assert_close(captured["refs"][0], initial, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(captured["refs"][1:]), taps["2"], atol=1e-5, rtol=0)
