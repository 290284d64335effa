"""DINO: mixed query selection, look forward twice, presets, the official-checkpoint converter
and the transformer internals against the official fixture."""

from __future__ import annotations

import warnings

import pytest
import torch

from detrkit.config import ConfigError
from detrkit.convert import dino as conv
from detrkit.convert.keymap import ConversionError
from detrkit.convert.official import from_official, official_to_config
from detrkit.models import build_model
from detrkit.models.queries import QuerySelection
from detrkit.presets import get_preset
from tests.models.test_dab_deformable import SHAPES, anchor_part, random_targets
from tests.models.test_deformable import levels_input, padded_batch, small_part
from tests.parity.fixtures import fixture_names, load_fixture


def dino_part(**kw):
    args = dict(query_kind="mixed", box_update="look_forward_twice", query_scale=False,
                decoder_norm=True, share_class_head=True, share_box_head=True)
    args.update(kw)
    return anchor_part(**args)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name,levels", [("dino_4scale_r50", 4), ("dino_5scale_r50", 5)])
def test_presets_follow_the_official_config(name: str, levels: int) -> None:
    cfg = get_preset(name)
    m, t, q, h, d = (cfg.model, cfg.model.transformer, cfg.model.queries, cfg.model.heads,
                     cfg.model.denoising)
    assert (q.kind, q.box_update, q.num_queries, q.learned_content) == \
        ("mixed", "look_forward_twice", 900, True)
    assert (d.kind, d.dn_number, d.label_noise_ratio, d.box_noise_scale) == ("cdn", 100, 0.5, 0.4)
    assert (t.num_feature_levels, t.dim_feedforward, t.dropout, t.decoder_norm,
            t.decoder_query_scale) == (levels, 2048, 0.0, True, False)
    assert m.backbone.levels == ([1, 2, 3, 4] if levels == 5 else None)
    assert (m.position.temperature_h, m.position.temperature_w, m.position.offset) == \
        (20.0, 20.0, 0.0)
    assert (h.share_decoder_class, h.share_decoder_box, h.share_encoder_class,
            h.share_encoder_box) == (True, True, False, False)
    loss = cfg.loss
    assert (loss.class_loss, loss.class_weight, loss.bbox_weight, loss.giou_weight) == \
        ("focal", 1.0, 5.0, 2.0)
    assert (loss.matcher.cost_class, loss.matcher.cost_bbox, loss.matcher.cost_giou) == \
        (2.0, 5.0, 2.0)
    assert cfg.postprocess.num_select == 300
    tr = cfg.train
    assert (tr.epochs, tr.lr_drop, tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult) == \
        (12, 11, 1e-4, 1e-5, 0.1)


def test_ablation_switches_compose() -> None:
    """The DINO switches (queries, box update, denoising) compose on a deformable preset:
    every query kind and box update, every denoising kind, builds and trains."""
    images, mask = padded_batch([(64, 48)])
    targets = random_targets([2], 4)
    for kind, update, dn in (("mixed", "none", "none"), ("mixed", "refine", "dn"),
                             ("anchors", "look_forward_twice", "cdn"),
                             ("anchors", "none", "dn")):
        cfg = get_preset("test_dino_tiny")
        cfg.model.queries.kind, cfg.model.queries.box_update = kind, update  # type: ignore
        cfg.model.denoising.kind = dn  # type: ignore[assignment]
        cfg.model.transformer.enc_layers = 1
        out = build_model(cfg.validate()).train()(images, mask, targets)
        assert out.logits.shape == (1, 30, 4) and (out.enc is not None) == (kind == "mixed")
        assert (out.dn is not None) == (dn != "none")
        assert out.dn is None or out.dn.meta.kind == dn
    cfg = get_preset("test_deformable_detr_tiny_refine")
    cfg.model.queries.box_update = "look_forward_twice"
    with torch.no_grad():
        assert build_model(cfg.validate())(images, mask).boxes.shape == (1, 30, 4)
    cfg.model.denoising.kind = "cdn"
    with pytest.raises(ConfigError, match="model.denoising.kind"):
        cfg.validate()


# ----------------------------------------------------------------------------- queries


def test_mixed_query_selection_picks_the_best_proposals_as_detached_anchors() -> None:
    part = dino_part()
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    captured = {}
    part.decoder.register_forward_hook(
        lambda mod, args, out: captured.update(tgt=args[0], anchors=args[1]))
    out = part(srcs, masks, pos)
    # the selection: top-8 encoder tokens by their best class logit, best first
    with torch.no_grad():
        memory = part.encoder(*_encoder_inputs(part, srcs, masks, pos))
        features, _, _ = part.query_selection.proposals(
            memory, torch.zeros(1, memory.shape[1], dtype=torch.bool), SHAPES)
        logits = part.enc_class_embed(features)
    best = logits.max(-1)[0].topk(8, dim=1)[1]
    torch.testing.assert_close(out.enc.logits, logits[0, best[0]][None])
    assert (out.enc.logits.max(-1)[0][0].diff() <= 0).all()
    torch.testing.assert_close(captured["anchors"], out.enc.boxes.detach())
    assert not captured["anchors"].requires_grad
    torch.testing.assert_close(captured["tgt"], part.tgt_embed.weight[None])
    # the decoder's loss does not reach the proposal heads; the encoder's loss does
    out.boxes.sum().backward(retain_graph=True)
    assert part.enc_bbox_embed.layers[0].weight.grad is None
    out.enc.boxes.sum().backward()
    assert part.enc_bbox_embed.layers[0].weight.grad is not None


def _encoder_inputs(part, srcs, masks, pos):
    from detrkit.models.deformable_encoder import flatten_levels

    flat = flatten_levels(srcs, masks, pos, part.level_embed)
    return (flat.tokens, flat.pos, flat.spatial_shapes, flat.level_start_index,
            flat.valid_ratios, flat.padding)


def test_selected_content_is_the_detached_encoder_feature() -> None:
    part = dino_part(learned_content=False)
    assert part.tgt_embed is None
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(tgt=args[0]))
    part(srcs, masks, pos)
    with torch.no_grad():
        memory = part.encoder(*_encoder_inputs(part, srcs, masks, pos))
        features, _, _ = part.query_selection.proposals(
            memory, torch.zeros(1, memory.shape[1], dtype=torch.bool), SHAPES)
        index = part.enc_class_embed(features).max(-1)[0].topk(8, dim=1)[1]
    torch.testing.assert_close(captured["tgt"], features[0, index[0]][None])
    assert not captured["tgt"].requires_grad


def test_selection_ranks_by_the_best_class_and_skips_invalid_tokens() -> None:
    logits = torch.tensor([[[9.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0], [0.0, 8.0]]])
    invalid = torch.tensor([[True, False, False, False, False]])
    ours = QuerySelection(8, num_queries=3, select_valid_only=True)
    official = QuerySelection(8, num_queries=3, select_valid_only=False)
    assert ours.select(logits, invalid)[0].tolist() == [4, 2, 3]
    assert official.select(logits, invalid)[0].tolist() == [0, 4, 2]
    with pytest.raises(ValueError, match="num_queries"):
        QuerySelection(8, num_queries=6).select(logits, invalid)


@pytest.mark.parametrize("update,reaches", [("look_forward_twice", True), ("refine", False)])
def test_look_forward_twice_lets_the_next_layer_train_the_previous_box(update: str,
                                                                      reaches: bool) -> None:
    part = dino_part(box_update=update, share_box_head=False, share_class_head=False)
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    out = part(srcs, masks, pos)
    out.boxes.sum().backward()  # the last layer (2) only
    assert (part.bbox_embed[1].layers[0].weight.grad is not None) == reaches
    assert part.bbox_embed[0].layers[0].weight.grad is None  # two layers back: never


@pytest.mark.parametrize("update,reaches", [("look_forward_twice", True), ("refine", False)])
def test_look_forward_twice_in_deformable_detr(update: str, reaches: bool) -> None:
    part = small_part("two_stage", update)
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    part(srcs, masks, pos).boxes.sum().backward()
    assert (part.bbox_embed[1].layers[0].weight.grad is not None) == reaches
    assert part.bbox_embed[0].layers[0].weight.grad is None


def test_decoder_norm_feeds_the_heads_but_not_the_anchor_update() -> None:
    part = dino_part(share_box_head=False, share_class_head=False)
    srcs, masks, pos = levels_input(SHAPES, SHAPES, d=32)
    captured = {}
    part.decoder.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    part.decoder.layers[0].register_forward_hook(lambda mod, args, out: captured.update(raw=out))
    with torch.no_grad():
        out = part(srcs, masks, pos)
    hidden, anchors = captured["out"]
    torch.testing.assert_close(hidden[0], part.decoder.norm(captured["raw"]))
    torch.testing.assert_close(out.aux[0].logits, part.class_embed[0](hidden[0]))
    from detrkit.models.deformable_decoder import refine_reference

    torch.testing.assert_close(anchors[1], refine_reference(
        part.bbox_embed[0](captured["raw"]), anchors[0], 1e-3))


# ----------------------------------------------------------------------------- conversion


def official_args(**kw) -> dict:
    args = {"modelname": "dino", "backbone": "resnet18", "dilation": False, "hidden_dim": 64,
            "nheads": 4, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 32,
            "num_queries": 12, "num_feature_levels": 4, "return_interm_indices": [1, 2, 3],
            "enc_n_points": 2, "dec_n_points": 3, "num_classes": 5, "dn_labelbook_size": 5,
            "dn_number": 7, "dn_label_noise_ratio": 0.4, "dn_box_noise_scale": 0.6,
            "two_stage_type": "standard", "embed_init_tgt": True, "num_select": 40,
            "dec_pred_class_embed_share": True, "dec_pred_bbox_embed_share": True,
            "two_stage_class_embed_share": False, "two_stage_bbox_embed_share": False,
            "position_embedding": "sine", "pe_temperatureH": 20, "pe_temperatureW": 20,
            "dropout": 0.0, "use_dn": True}
    args.update(kw)
    return args


CONFIGURATIONS = {
    "default": {},
    "5scale": {"num_feature_levels": 5, "return_interm_indices": [0, 1, 2, 3]},
    "1scale_no_two_stage": {"num_feature_levels": 1, "return_interm_indices": [3],
                            "two_stage_type": "no"},
    "separate_heads": {"dec_pred_class_embed_share": False, "dec_pred_bbox_embed_share": False},
    "shared_encoder_heads": {"two_stage_class_embed_share": True,
                             "two_stage_bbox_embed_share": True},
    "selected_content": {"embed_init_tgt": False},
    "detached_outputs_big_labelbook": {"use_detached_boxes_dec_out": True,
                                       "dn_labelbook_size": 40},
}


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_every_official_configuration_round_trips(name: str) -> None:
    args = official_args(**CONFIGURATIONS[name])
    cfg = official_to_config(args)
    m, q, h = cfg.model, cfg.model.queries, cfg.model.heads
    assert q.kind == ("anchors" if args["two_stage_type"] == "no" else "mixed")
    assert q.learned_content == args["embed_init_tgt"]
    assert q.box_update == ("refine" if args.get("use_detached_boxes_dec_out")
                            else "look_forward_twice")
    assert (h.share_decoder_class, h.share_encoder_box) == \
        (args["dec_pred_class_embed_share"], args["two_stage_bbox_embed_share"])
    assert m.backbone.levels == {"5scale": [1, 2, 3, 4], "1scale_no_two_stage": None}.get(name)
    d = m.denoising
    assert (d.kind, d.dn_number, d.label_noise_ratio, d.box_noise_scale) == ("cdn", 7, 0.4, 0.6)
    assert cfg.postprocess.num_select == 40
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # "trained" weights: heads that start as copies drift apart
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    official = conv.to_official(model.state_dict(), cfg)
    assert official["label_enc.weight"].shape == (args["dn_labelbook_size"] + 1, 64)
    assert ("transformer.tgt_embed.weight" in official) == args["embed_init_tgt"]
    shared = args["dec_pred_bbox_embed_share"]
    assert torch.equal(official["bbox_embed.1.layers.0.weight"],
                       official["transformer.decoder.bbox_embed.0.layers.0.weight"]) == shared
    with warnings.catch_warnings():  # shapes + what no weight reveals give the same model
        warnings.simplefilter("ignore")
        given = {"nheads": 4, "dropout": 0.0, "num_queries": 12, "num_select": 40,
                 "use_detached_boxes_dec_out": args.get("use_detached_boxes_dec_out", False)}
        inferred = official_to_config(given, official)
    inferred.model.denoising = cfg.model.denoising  # noise settings are not in the weights
    assert inferred.model == cfg.model
    loaded = from_official(official, args)
    images, mask = padded_batch([(96, 80), (64, 96)])
    with torch.no_grad():
        a, b = model(images, mask), loaded(images, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)


@pytest.mark.parametrize("key,value", [
    ("two_stage_add_query_num", 10), ("dec_layer_number", [1]), ("decoder_sa_type", "ca_label"),
    ("two_stage_learn_wh", True), ("transformer_activation", "selu"), ("num_patterns", 2)])
def test_unsupported_options_are_refused(key: str, value) -> None:
    with pytest.raises(ConversionError, match=key):
        official_to_config(official_args(**{key: value}))


# ----------------------------------------------------------------------------- parity


DINO_FIXTURES = [n for n in fixture_names() if load_fixture(n).family == "dino"]


@pytest.mark.parity
@pytest.mark.parametrize("name", DINO_FIXTURES)
def test_fixture_taps(name: str) -> None:
    """Decoder states, anchors and the selected proposals match the official transformer."""
    fx = load_fixture(name)
    t = fx.tensors
    model = from_official(fx.state_dict(), fx.meta["official_args"])
    captured = {}
    model.transformer.decoder.register_forward_hook(
        lambda mod, args, out: captured.update(hidden=out[0], refs=out[1]))
    with torch.no_grad():
        out = model(t["inputs.images"], t["inputs.mask"])
    taps = fx.group("taps.transformer_return")
    torch.testing.assert_close(captured["hidden"], taps["0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(captured["refs"]), taps["1"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.enc.boxes, taps["3"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.enc.logits, t["outputs.interm_outputs.pred_logits"],
                               atol=1e-4, rtol=0)
