"""Deformable DETR: the transformer part, its presets and the official-checkpoint converter."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from detrkit.convert import deformable_detr as conv
from detrkit.convert.keymap import ConversionError, load_strict
from detrkit.convert.official import from_official, official_to_config
from detrkit.models import build_model
from detrkit.models.deformable_encoder import encoder_reference_points, valid_ratio
from detrkit.models.deformable_transformer import DeformableTransformer
from detrkit.models.position import SinePositionEncoding
from detrkit.models.queries import TwoStageQueries, encoder_proposals, proposal_sine_embedding
from detrkit.ops.msda import MSDeformAttn
from detrkit.presets import get_preset, list_presets
from tests.parity.fixtures import fixture_names, fixtures_dir, load_fixture

DEFORMABLE_PRESETS = [n for n in list_presets() if "deformable_detr" in n
                      and not n.startswith(("dab", "dn", "test_dab", "test_dn"))]
TINY_PRESETS = [n for n in DEFORMABLE_PRESETS if n.startswith("test_")]
FULL_PRESETS = [n for n in DEFORMABLE_PRESETS if not n.startswith("test_")]


def padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the given ``(h, w)`` in the top-left corner of a zero-padded batch."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, hp, wp)
    mask = torch.ones(len(sizes), hp, wp, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


# ----------------------------------------------------------------------------- presets


def test_presets_exist_with_the_official_recipe() -> None:
    assert {"deformable_detr_r50", "deformable_detr_r50_single_scale",
            "deformable_detr_r50_single_scale_dc5", "deformable_detr_r50_refine",
            "deformable_detr_r50_two_stage", "test_deformable_detr_tiny"} <= set(DEFORMABLE_PRESETS)
    cfg = get_preset("deformable_detr_r50_two_stage")
    m, t = cfg.model, cfg.model.transformer
    assert (t.attention, t.num_feature_levels, t.dim_feedforward, t.enc_n_points) == \
        ("deformable", 4, 1024, 4)
    assert (m.queries.kind, m.queries.box_update, m.queries.num_queries) == \
        ("two_stage", "refine", 300)
    assert (m.class_activation, cfg.loss.class_loss, m.position.offset) == ("sigmoid", "focal", 0.5)
    assert (cfg.loss.class_weight, cfg.loss.matcher.cost_class,
            cfg.postprocess.num_select) == (2, 2, 100)
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
    single = get_preset("deformable_detr_r50_single_scale_dc5")
    assert single.model.transformer.num_feature_levels == 1 and single.model.backbone.dilation


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_full_size_presets_build_with_official_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = build_model(get_preset(name))
    # official counts (unique tensors) from keys_full_size.json, see KEYS.md
    official = {"deformable_detr_r50": 40_175_905, "deformable_detr_r50_single_scale": 34_172_833,
                "deformable_detr_r50_single_scale_dc5": 34_172_833,
                "deformable_detr_r50_refine": 40_955_900,
                "deformable_detr_r50_two_stage": 41_287_769}
    total = sum(v.numel() for v in model.state_dict().values())
    assert total == official[name]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_forward_backward_with_padding(name: str, batch: int) -> None:
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).train()
    sizes = [(64, 48), (48, 64), (56, 56)][:batch]
    images, mask = padded_batch(sizes)
    out = model(images, mask)
    q, c, t = cfg.model.queries.num_queries, cfg.model.num_classes, cfg.model.transformer
    assert out.logits.shape == (batch, q, c) and out.boxes.shape == (batch, q, 4)
    assert len(out.aux) == t.dec_layers - 1
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    loss = sum(o.logits.sigmoid().sum() + o.boxes.sum() for o in [out.final, *out.aux])
    if cfg.model.queries.kind == "two_stage":
        assert out.enc is not None
        valid = out.enc.boxes[out.enc.boxes.lt(1).all(-1)]
        loss = loss + out.enc.logits.sigmoid().sum() + valid.sum()
    else:
        assert out.enc is None
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_backend_from_config_reaches_every_attention() -> None:
    cfg = get_preset("test_deformable_detr_tiny_two_stage")
    cfg.model.transformer.msda_backend = "reference"
    model = build_model(cfg)
    backends = {m.backend for m in model.modules() if isinstance(m, MSDeformAttn)}
    assert backends == {"reference"}
    assert get_preset("test_deformable_detr_tiny").model.transformer.msda_backend == "auto"


# ----------------------------------------------------------------------------- transformer part


def small_part(query_kind: str = "reference_points", box_update: str = "none",
               levels: int = 4, **kw) -> DeformableTransformer:
    torch.manual_seed(0)
    part = DeformableTransformer(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3,
                                 dim_feedforward=32, dropout=0.0, num_feature_levels=levels,
                                 num_queries=8, num_logits=5, query_kind=query_kind,
                                 box_update=box_update, msda_backend="reference", **kw)
    with torch.no_grad():  # break the symmetric initialisation so that every path matters
        for p in part.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return part.eval()


def levels_input(shapes: list[tuple[int, int]], valid: list[tuple[int, int]], batch: int = 1,
                 d: int = 32, seed: int = 0):
    """Random maps of ``shapes`` whose image part is ``valid`` (garbage in the padding)."""
    g = torch.Generator().manual_seed(seed)
    srcs, masks = [], []
    for (h, w), (vh, vw) in zip(shapes, valid):
        srcs.append(torch.randn(batch, d, h, w, generator=g))
        mask = torch.ones(batch, h, w, dtype=torch.bool)
        mask[:, :vh, :vw] = False
        masks.append(mask)
    pos_enc = SinePositionEncoding(d // 2, offset=0.5)
    return srcs, masks, [pos_enc(m) for m in masks]


@pytest.mark.parametrize("query_kind,box_update", [("reference_points", "none"),
                                                   ("reference_points", "refine"),
                                                   ("two_stage", "refine"),
                                                   ("two_stage", "none")])
def test_padded_image_gives_the_same_detections_as_unpadded(query_kind: str,
                                                            box_update: str) -> None:
    part = small_part(query_kind, box_update)
    valid = [(8, 10), (4, 5), (2, 3), (1, 2)]
    padded = [(11, 13), (6, 7), (3, 4), (2, 2)]
    srcs, masks, _ = levels_input(padded, valid, batch=2)
    for m in masks:  # the second image fills the batch: only the first one is padded
        m[1] = False
    pos = [SinePositionEncoding(16, offset=0.5)(m) for m in masks]
    single = [s[:1, :, :h, :w] for s, (h, w) in zip(srcs, valid)]
    single_masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in valid]
    single_pos = [SinePositionEncoding(16, offset=0.5)(m) for m in single_masks]
    with torch.no_grad():
        out_pad = part(srcs, masks, pos)
        out_one = part(single, single_masks, single_pos)
    torch.testing.assert_close(out_pad.logits[:1], out_one.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_pad.boxes[:1], out_one.boxes, atol=1e-5, rtol=1e-5)
    for a, b in zip(out_pad.aux, out_one.aux):
        torch.testing.assert_close(a.boxes[:1], b.boxes, atol=1e-5, rtol=1e-5)
    if query_kind == "two_stage":
        tokens = ~torch.cat([m[:1].flatten(1) for m in masks], 1)[0]
        torch.testing.assert_close(out_pad.enc.logits[0, tokens], out_one.enc.logits[0],
                                   atol=1e-4, rtol=1e-4)
        assert (out_pad.enc.boxes[0, ~tokens] == 1.0).all()


def test_two_stage_encoder_outputs_cover_every_token() -> None:
    part = small_part("two_stage", "refine")
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    srcs, masks, pos = levels_input(shapes, [(6, 10), (3, 5), (2, 3), (1, 2)], batch=2)
    with torch.no_grad():
        out = part(srcs, masks, pos)
    tokens = sum(h * w for h, w in shapes)
    assert out.enc.logits.shape == (2, tokens, 5) and out.enc.boxes.shape == (2, tokens, 4)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    assert (out.enc.boxes[padding] == 1.0).all()
    assert ((out.enc.boxes[~padding] < 1.0).any(-1)).all()


def test_two_stage_selection_skips_invalid_tokens_unless_official() -> None:
    logits = torch.tensor([[[9.0], [1.0], [3.0], [2.0], [8.0]]])  # [1, 5, 1]
    boxes = torch.arange(20.0).view(1, 5, 4)
    invalid = torch.tensor([[True, False, False, False, True]])
    ours = TwoStageQueries(8, num_queries=2, select_valid_only=True)
    official = TwoStageQueries(8, num_queries=2, select_valid_only=False)
    assert ours.select(logits, boxes, invalid)[0, :, 0].tolist() == [8.0, 12.0]  # tokens 2, 3
    assert official.select(logits, boxes, invalid)[0, :, 0].tolist() == [0.0, 16.0]  # tokens 0, 4
    with pytest.raises(ValueError, match="num_queries"):
        TwoStageQueries(8, num_queries=6).select(logits, boxes, invalid)


def test_encoder_proposals_anchor_sizes_and_invalid_tokens() -> None:
    shapes = [(4, 4), (2, 2)]
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # the image covers 3 of 4 columns
    mask1 = torch.tensor([[[False, True], [False, True]]])  # 1 of 2 columns at level 1
    padding = torch.cat([mask.flatten(1), mask1.flatten(1)], 1)  # [1, 20]
    proposals, invalid = encoder_proposals(padding, shapes)
    boxes = proposals.sigmoid()[0]
    # centres relative to the valid part (3 of 4 columns; 1 of 2 at level 1), size 0.05 * 2**l
    torch.testing.assert_close(boxes[1], torch.tensor([1.5 / 3, 0.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(boxes[16], torch.tensor([0.5, 0.25, 0.1, 0.1]))
    assert torch.equal(invalid, padding) and proposals[padding].isinf().all()
    # anchors too close to the border are invalid too
    _, invalid = encoder_proposals(torch.zeros(1, 80 * 80, dtype=torch.bool), [(80, 80)])
    assert invalid[0, 0] and not invalid[0, 81]


def test_proposal_sine_embedding_matches_the_256_wide_layout() -> None:
    boxes = torch.tensor([[[0.3, -1.0, 2.0, 0.0]]])
    emb = proposal_sine_embedding(boxes, 128)
    assert emb.shape == (1, 1, 512)
    x = boxes.sigmoid()[0, 0, 1] * 2 * math.pi  # coordinate 1, frequency pair 3 -> dims 128+6, +7
    freq = 10000 ** (2 * 3 / 128)
    torch.testing.assert_close(emb[0, 0, 128 + 6], (x / freq).sin())
    torch.testing.assert_close(emb[0, 0, 128 + 7], (x / freq).cos())
    assert proposal_sine_embedding(boxes, 16).shape == (1, 1, 64)  # d = 32 -> 2d


def test_refine_switches_from_points_to_boxes_and_detaches() -> None:
    part = small_part("reference_points", "refine")
    assert len(part.class_embed) == 3 and len(part.bbox_embed) == 3
    shapes = [(6, 6), (3, 3), (2, 2), (1, 1)]
    srcs, masks, pos = levels_input(shapes, shapes)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(refs=out[1]))
    out = part(srcs, masks, pos)
    refs = captured["refs"]
    assert refs[0].shape[-1] == 2 and all(r.shape[-1] == 4 for r in refs[1:])
    assert not any(r.requires_grad for r in refs[1:])
    # the last layer's boxes do not back-propagate into the first layer's box head
    out.boxes.sum().backward()
    assert part.bbox_embed[0].layers[0].weight.grad is None
    assert part.bbox_embed[2].layers[0].weight.grad is not None
    # layer i's boxes refine the reference that layer i used
    torch.testing.assert_close(out.aux[1].boxes, refs[2])


def test_without_refinement_heads_are_shared_and_references_fixed() -> None:
    part = small_part("reference_points", "none")
    assert len(part.class_embed) == 1 and len(part.bbox_embed) == 1
    shapes = [(6, 6), (3, 3), (2, 2), (1, 1)]
    srcs, masks, pos = levels_input(shapes, shapes)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(refs=out[1]))
    with torch.no_grad():
        part(srcs, masks, pos)
    assert all(r is captured["refs"][0] for r in captured["refs"])


def test_head_initialisation_follows_the_official_code() -> None:
    prior = -math.log((1 - 0.01) / 0.01)
    plain = DeformableTransformer(64, 4, 1, 2, 64, num_feature_levels=2, num_queries=4,
                                  num_logits=3)
    refine = DeformableTransformer(64, 4, 1, 2, 64, num_feature_levels=2, num_queries=4,
                                   num_logits=3, box_update="refine")
    two = DeformableTransformer(64, 4, 1, 2, 64, num_feature_levels=2, num_queries=4,
                                num_logits=3, query_kind="two_stage", box_update="refine")
    torch.testing.assert_close(plain.class_embed[0].bias, torch.full((3,), prior))
    assert plain.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert plain.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.bbox_embed[1].layers[-1].bias.tolist() == [0, 0, 0, 0]
    assert torch.equal(refine.class_embed[0].weight, refine.class_embed[1].weight)  # clones
    assert all(h.layers[-1].bias.abs().sum() == 0 for h in two.bbox_embed)
    assert two.enc_class_embed is not None and two.query_embed is None
    assert two.reference_points is None


def test_valid_ratio_and_encoder_reference_points() -> None:
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[:, :2, :6] = False
    ratios = valid_ratio(mask)
    torch.testing.assert_close(ratios, torch.tensor([[6 / 8, 2 / 4]]))
    # the same image (2 x 6) as level 0 and at half resolution (1 x 3) as level 1
    ref = encoder_reference_points([(4, 8), (2, 4)], torch.tensor([[[0.75, 0.5], [0.75, 0.5]]]))
    assert ref.shape == (1, 32 + 8, 2, 2)
    # pixel (0, 1) of level 0: centre x = 1.5 / 6 of the image -> 1.5 / 6 * 0.75 of the padded map
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([1.5 / 6 * 0.75, 0.5 / 2 * 0.5]))


# ----------------------------------------------------------------------------- conversion


def full_size_models() -> dict[str, dict]:
    path = fixtures_dir() / "keys_full_size.json"
    if not path.is_file():
        return {}
    models = json.loads(path.read_text())["models"]
    return {k: v for k, v in models.items() if v["family"] == "deformable_detr"}


@pytest.mark.parametrize("name", sorted(full_size_models()) or
                         [pytest.param("none", marks=pytest.mark.skip("no keys_full_size.json"))])
def test_full_size_official_keys_map_completely(name: str) -> None:
    spec = full_size_models()[name]
    one = torch.zeros(1)
    state = {k: one.expand(*v["shape"]) for k, v in spec["keys"].items()}  # no memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = official_to_config({}, state)  # everything from the key set and shapes
    cfg = official_to_config(spec["config"], state)
    for c in (inferred, cfg):
        q, t = c.model.queries, c.model.transformer
        assert (q.kind == "two_stage") == spec["config"]["two_stage"]
        assert (q.box_update == "refine") == spec["config"]["with_box_refine"]
        assert (t.num_feature_levels, t.enc_layers, t.dec_layers, t.dim_feedforward,
                c.model.num_classes) == (4 if "single" not in name else 1, 6, 6, 1024, 91)
    with torch.device("meta"):
        model = build_model(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped, unmatched = conv.from_official(state, cfg)
    assert unmatched == [] and set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == own[k] for k in own)
    # writing back restores every official key, aliases included
    back = conv.to_official(mapped, cfg)
    assert set(back) == set(state)
    groups = spec["alias_groups"]
    assert sum(len(v) for v in groups.values()) == len(state) - len(mapped)


def official_args(levels: int, refine: bool, two_stage: bool) -> dict:
    return {"backbone": "resnet18", "dilation": False, "hidden_dim": 64, "nheads": 4,
            "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 32, "num_queries": 10,
            "num_feature_levels": levels, "enc_n_points": 2, "dec_n_points": 3,
            "with_box_refine": refine, "two_stage": two_stage, "position_embedding": "sine",
            "dataset_file": "coco", "num_classes_override": 5, "dropout": 0.0}


@pytest.mark.parametrize("levels,refine,two_stage", [(1, False, False), (3, True, False),
                                                     (4, False, True), (5, True, True)])
def test_every_official_configuration_round_trips(levels: int, refine: bool,
                                                  two_stage: bool) -> None:
    args = official_args(levels, refine, two_stage)
    cfg = official_to_config(args)
    assert cfg.model.transformer.num_feature_levels == levels
    assert (cfg.model.transformer.enc_n_points, cfg.model.transformer.dec_n_points) == (2, 3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    official = conv.to_official(model.state_dict(), cfg)
    num_pred = 2 + int(two_stage)
    assert f"class_embed.{num_pred - 1}.weight" in official
    assert ("transformer.decoder.bbox_embed.0.layers.0.weight" in official) == refine
    assert ("transformer.decoder.class_embed.0.weight" in official) == two_stage
    assert ("query_embed.weight" in official) != two_stage
    assert sum(k.startswith("input_proj.") and k.endswith(".0.weight") for k in official) == levels
    # shapes alone (plus the two values no weight reveals) give the same config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = official_to_config({"num_queries": 10, "nheads": 4, "dropout": 0.0}, official)
    assert inferred.model == cfg.model
    loaded = from_official(official, args)
    images, mask = padded_batch([(96, 80), (64, 96)])
    with torch.no_grad():
        a, b = model(images, mask), loaded(images, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)


def test_two_stage_without_refinement_shares_the_encoder_head() -> None:
    cfg = official_to_config(official_args(4, False, True))
    official = conv.to_official(build_model(cfg).state_dict(), cfg)
    for i in range(3):  # class_embed.{0..2} and transformer.decoder.class_embed.{0..2} alias .0
        assert torch.equal(official[f"class_embed.{i}.weight"], official["class_embed.0.weight"])
        assert f"transformer.decoder.class_embed.{i}.weight" in official
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in official)


def test_conversion_errors_are_explicit() -> None:
    args = official_args(4, True, False)
    cfg = official_to_config(args)
    official = conv.to_official(build_model(cfg).state_dict(), cfg)
    official["transformer.decoder.bbox_embed.1.layers.0.bias"] = \
        official["bbox_embed.1.layers.0.bias"] + 1
    with pytest.raises(ConversionError, match="same tensor"):
        from_official(official, args)
    with pytest.raises(ConversionError, match="num_feature_levels=2"):
        official_to_config(official_args(2, False, False))
    model = build_model(cfg)
    state, _ = conv.from_official(conv.to_official(model.state_dict(), cfg), cfg)
    state.pop("transformer.level_embed")
    with pytest.raises(ConversionError, match="level_embed"):
        load_strict(model, state, "test")


# ----------------------------------------------------------------------------- parity


DEFORMABLE_FIXTURES = [n for n in fixture_names()
                       if load_fixture(n).family == "deformable_detr"]


@pytest.mark.parity
@pytest.mark.parametrize("name", DEFORMABLE_FIXTURES)
def test_fixture_float64_and_taps(name: str) -> None:
    """Float64 outputs to 1e-9 and the transformer internals (taps) in float32."""
    fx = load_fixture(name)
    t = fx.tensors
    model = from_official(fx.state_dict(torch.float64), fx.meta["official_args"]).double()
    with torch.no_grad():
        out = model(t["inputs.images"].double(), t["inputs.mask"])
    torch.testing.assert_close(out.logits, t["outputs_fp64.pred_logits"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out.boxes, t["outputs_fp64.pred_boxes"], atol=1e-9, rtol=0)
    if out.enc is not None:
        torch.testing.assert_close(out.enc.boxes, t["outputs_fp64.enc_outputs.pred_boxes"],
                                   atol=1e-9, rtol=0)

    model = model.float()
    captured = {}
    model.transformer.decoder.register_forward_hook(
        lambda mod, args, out: captured.update(hidden=out[0], refs=out[1]))
    with torch.no_grad():
        out = model(t["inputs.images"], t["inputs.mask"])
    taps = fx.group("taps.transformer_return")
    torch.testing.assert_close(captured["hidden"], taps["0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(captured["refs"][0], taps["1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(captured["refs"][1:]), taps["2"], atol=1e-5, rtol=0)
    if "3" in taps:
        torch.testing.assert_close(out.enc.logits, taps["3"], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["test_deformable_detr_tiny_two_stage",
                                  "test_deformable_detr_tiny"])
def test_cuda_auto_backend_matches_reference(name: str) -> None:
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg).cuda().eval()
    images, mask = padded_batch([(128, 96), (96, 128)])
    images, mask = images.cuda(), mask.cuda()
    with torch.no_grad():
        auto = model(images, mask)
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = "reference"
        ref = model(images, mask)
    torch.testing.assert_close(auto.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(auto.boxes, ref.boxes, atol=1e-5, rtol=1e-4)
    model.train()
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.backend = "auto"
    out = model(images, mask)
    (out.logits.sigmoid().sum() + out.boxes.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
