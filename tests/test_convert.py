"""Official checkpoint conversion: key rules, family detection, inference of the architecture
from shapes, file formats, strictness, and DETR variants the fixtures do not cover (pre-norm,
learned position encoding, DC5, other depths / layer / query counts) via a round trip through
the official key layout."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

from detrkit.checkpoint import load_checkpoint, load_model
from detrkit.config import Config, to_dict
from detrkit.convert import (ConversionError, coco_label_map, convert_checkpoint, detect_family,
                             from_official, load_official, official_to_config, read_checkpoint,
                             to_official_state_dict)
from detrkit.convert.keymap import KeyRule, drop_aliases, rename
from detrkit.convert.official import apply_training_args, infer_backbone, resolve_num_classes
from detrkit.models import build_model
from detrkit.models.backbone import ResNetBackbone
from detrkit.presets import get_preset
from tests.parity.fixtures import fixtures_dir

KEYS_FULL_SIZE = fixtures_dir() / "keys_full_size.json"


# ----------------------------------------------------------------------------- key rules


def test_key_rule_placeholders_and_reverse():
    rule = KeyRule("transformer.decoder.layers.{n}.multihead_attn.",
                   "transformer.decoder.layers.{n}.cross_attn.")
    assert rule.apply("transformer.decoder.layers.11.multihead_attn.out_proj.weight") == \
        "transformer.decoder.layers.11.cross_attn.out_proj.weight"
    assert rule.apply("transformer.decoder.layers.1.self_attn.in_proj_weight") is None
    assert rule.apply("transformer.decoder.layers.3.cross_attn.in_proj_bias", reverse=True) == \
        "transformer.decoder.layers.3.multihead_attn.in_proj_bias"
    exact = KeyRule("transformer.level_embed", "transformer.level_embed")
    assert exact.apply("transformer.level_embed_x") is None


def test_rename_reports_unmatched_and_ignores():
    state = {"a.x": torch.zeros(1), "b.y": torch.zeros(1), "a.bn.num_batches_tracked": torch.zeros(1)}
    out, unmatched = rename(state, [KeyRule("a.", "z.")], ignore=[r"num_batches_tracked$"])
    assert set(out) == {"z.x"} and unmatched == ["b.y"]


def test_drop_aliases():
    t = torch.arange(4.0)
    state = {"bbox_embed.0.w": t, "bbox_embed.1.w": t.clone()}
    drop_aliases(state, {"bbox_embed.1.w": "bbox_embed.0.w"}, "ckpt")
    assert set(state) == {"bbox_embed.0.w"}
    bad = {"c.0": t, "c.1": t + 1}
    with pytest.raises(ConversionError, match="values differ"):
        drop_aliases(bad, {"c.1": "c.0"}, "ckpt")


# ----------------------------------------------------------------------------- detection


@pytest.mark.skipif(not KEYS_FULL_SIZE.is_file(), reason="keys_full_size.json not available")
def test_detect_family_of_every_published_layout():
    models = json.loads(KEYS_FULL_SIZE.read_text())["models"]
    for name, info in models.items():
        state = {k: torch.empty(0) for k in info["keys"]}
        assert detect_family(state) == info["family"], name


@pytest.mark.skipif(not KEYS_FULL_SIZE.is_file(), reason="keys_full_size.json not available")
@pytest.mark.parametrize("preset", ["detr_r50", "detr_r101"])
def test_full_size_detr_key_layout_matches_official(preset):
    info = json.loads(KEYS_FULL_SIZE.read_text())["models"]["detr_r50"]
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = build_model(cfg)
    official = to_official_state_dict(model.state_dict(), cfg, "detr")
    expected = dict(info["keys"])
    if preset == "detr_r101":  # R101 differs only in backbone.0.body.layer3.*
        assert sum(k.startswith("backbone.0.body.layer3.") for k in official) == 23 * 15 + 5  # 3 convs + 3 x 4 bn buffers per block, downsample
        official = {k: v for k, v in official.items() if not k.startswith("backbone.0.body.layer3.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("backbone.0.body.layer3.")}
    assert set(official) == set(expected)
    for k, v in official.items():
        assert list(v.shape) == expected[k]["shape"], k


def test_unknown_families_and_incomplete_checkpoints():
    with pytest.raises(ConversionError, match="cannot tell"):
        detect_family({"foo.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="segmentation"):
        detect_family({"detr.query_embed.weight": torch.zeros(1)})
    dino_like = {"transformer.tgt_embed.weight": torch.zeros(1), "label_enc.weight": torch.zeros(1)}
    assert detect_family(dino_like) == "dino"
    with pytest.raises(ConversionError, match="ResNet"):  # a DINO key set without a backbone
        from_official(dino_like)
    with pytest.raises(ConversionError, match="unknown model family"):
        from_official({"query_embed.weight": torch.zeros(1)}, family="yolo")


# ----------------------------------------------------------------------------- shared helpers


def test_infer_backbone_depth():
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        with torch.device("meta"):
            keys = {f"backbone.0.body.{k}": v for k, v in ResNetBackbone(name).body.state_dict().items()}
        assert infer_backbone(keys) == name


def test_num_classes_resolution():
    assert resolve_num_classes({"dataset_file": "coco"}, 91) == 91
    assert resolve_num_classes({"dataset_file": "coco", "num_classes_override": 7}, 7) == 7
    assert resolve_num_classes({"dataset_file": "coco"}, None) == 91
    assert resolve_num_classes({}, 12) == 12
    with pytest.warns(UserWarning, match="class head has 20"):
        assert resolve_num_classes({"dataset_file": "coco"}, 20) == 20


def test_coco_label_map():
    lm = coco_label_map()
    assert len(lm) == 91 and lm.category_ids[17] == 17
    assert (lm.names[1], lm.names[18], lm.names[90], lm.names[0], lm.names[12]) == (
        "person", "dog", "toothbrush", "N/A", "N/A")
    assert sum(n != "N/A" for n in lm.names) == 80


# ----------------------------------------------------------------------------- round trips


def _official_args(cfg: Config) -> dict:
    m, t = cfg.model, cfg.model.transformer
    return dict(backbone=m.backbone.name, dilation=m.backbone.dilation,
                position_embedding=m.position.kind, hidden_dim=t.hidden_dim, nheads=t.nheads,
                enc_layers=t.enc_layers, dec_layers=t.dec_layers,
                dim_feedforward=t.dim_feedforward, dropout=t.dropout, pre_norm=t.pre_norm,
                num_queries=m.queries.num_queries, aux_loss=m.aux_loss, masks=False,
                dataset_file="coco", num_classes_override=m.num_classes, lr_backbone=1e-5)


def _randomised(cfg: Config):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
            elif v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.05)
    return model


def _variant(**changes) -> Config:
    cfg = get_preset("test_detr_tiny")
    m, t = cfg.model, cfg.model.transformer
    for key, value in changes.items():
        if key in ("name", "dilation"):
            setattr(m.backbone, key, value)
        elif key == "position":
            m.position.kind = value
        elif key in ("num_queries",):
            m.queries.num_queries = value
        elif key == "num_classes":
            m.num_classes = value
        else:
            setattr(t, key, value)
    return cfg.validate()


VARIANTS = {
    "prenorm_learned": dict(pre_norm=True, position="learned", hidden_dim=32, nheads=2),
    "prenorm_no_encoder": dict(pre_norm=True, enc_layers=0, dec_layers=3),
    "dc5_r50_counts": dict(name="resnet50", dilation=True, enc_layers=1, dec_layers=3,
                           num_queries=7, dim_feedforward=48, num_classes=2),
    "r34_deep_decoder": dict(name="resnet34", enc_layers=3, dec_layers=4, nheads=8),
}


def _outputs(model, images, mask):
    with torch.no_grad():
        out = model(images, mask)
    return torch.cat([out.logits.flatten()] + [a.logits.flatten() for a in out.aux]), \
        torch.cat([out.boxes.flatten()] + [a.boxes.flatten() for a in out.aux])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_official_layout(variant, tmp_path):
    cfg = _variant(**VARIANTS[variant])
    model = _randomised(cfg)
    official = to_official_state_dict(model.state_dict(), cfg, "detr")
    assert not any(k.startswith(("neck.", "position.")) for k in official)
    if cfg.model.position.kind == "learned":
        assert "backbone.1.row_embed.weight" in official
    assert ("transformer.encoder.norm.weight" in official) == cfg.model.transformer.pre_norm
    path = tmp_path / "official.pth"
    torch.save({"model": official, "args": argparse.Namespace(**_official_args(cfg))}, path)

    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    expected = _outputs(model, images, mask)

    converted = load_official(path)  # everything from the stored args
    assert to_dict(converted.config.model) == to_dict(cfg.model)
    for got, want in zip(_outputs(converted.model, images, mask), expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    # the same from shapes alone, given only what weights cannot tell
    hint = {"nheads": cfg.model.transformer.nheads, "dilation": cfg.model.backbone.dilation}
    inferred = load_official(official, official_args=hint)
    inferred.config.model.transformer.dropout = cfg.model.transformer.dropout  # not in weights
    assert to_dict(inferred.config.model) == to_dict(cfg.model)
    for got, want in zip(_outputs(inferred.model, images, mask), expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_official_to_config_from_args_only():
    args = {"backbone": "resnet101", "dilation": True, "position_embedding": "sine",
            "hidden_dim": 256, "nheads": 8, "enc_layers": 6, "dec_layers": 6,
            "dim_feedforward": 2048, "dropout": 0.1, "pre_norm": False, "num_queries": 100,
            "aux_loss": True, "dataset_file": "coco", "eos_coef": 0.1, "lr_drop": 200,
            "epochs": 300, "set_cost_class": 1}
    cfg = official_to_config(argparse.Namespace(**args))
    reference = get_preset("detr_r101_dc5")
    assert to_dict(cfg.model) == to_dict(reference.model)
    assert (cfg.train.epochs, cfg.train.lr_drop, cfg.loss.eos_coef) == (300, 200, 0.1)
    with pytest.raises(ConversionError, match="hidden_dim"):
        official_to_config({"backbone": "resnet50", "dilation": False})


def test_training_args_of_every_family_reach_the_config():
    official = {"set_cost_class": 3, "set_cost_bbox": 4, "set_cost_giou": 5, "cls_loss_coef": 6,
                "bbox_loss_coef": 7, "giou_loss_coef": 8, "eos_coef": 0.3, "focal_alpha": 0.4,
                "lr": 1e-3, "lr_backbone": 1e-4, "lr_linear_proj_mult": 0.5,
                "weight_decay": 0.05, "clip_max_norm": 0.2, "epochs": 9, "lr_drop": 7,
                "batch_size": 3, "unrelated": "ignored"}
    cfg = get_preset("test_dino_tiny")
    apply_training_args(cfg, official)
    m, loss, tr = cfg.loss.matcher, cfg.loss, cfg.train
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (3, 4, 5)
    assert (loss.class_weight, loss.bbox_weight, loss.giou_weight) == (6, 7, 8)
    assert (loss.eos_coef, loss.focal_alpha) == (0.3, 0.4)
    assert (tr.lr, tr.lr_backbone, tr.lr_linear_proj_mult) == (1e-3, 1e-4, 0.5)
    assert (tr.weight_decay, tr.clip_max_norm) == (0.05, 0.2)
    assert (tr.epochs, tr.lr_drop, tr.batch_size) == (9, 7, 3)
    assert all(type(v) is int for v in (tr.epochs, tr.lr_drop, tr.batch_size))
    before = get_preset("test_dino_tiny")
    apply_training_args(before, {"lr": None})  # a null argument keeps the preset's value
    assert before.train.lr == get_preset("test_dino_tiny").train.lr


# ----------------------------------------------------------------------------- strictness


def _tiny_official():
    cfg = get_preset("test_detr_tiny")
    model = build_model(cfg)
    return cfg, to_official_state_dict(model.state_dict(), cfg, "detr")


def test_strict_loading_lists_offending_keys():
    cfg, state = _tiny_official()
    args = _official_args(cfg)
    extra = dict(state, **{"transformer.decoder.layers.0.extra_proj.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match="unexpected keys: .*extra_proj"):
        from_official(extra, official_args=args)
    missing = {k: v for k, v in state.items() if not k.startswith("bbox_embed.layers.2")}
    with pytest.raises(ConversionError, match="missing keys: .*transformer.bbox_embed.layers.2"):
        from_official(missing, official_args=args)
    unmapped = dict(state, **{"totally.unknown": torch.zeros(1)})
    with pytest.raises(ConversionError, match="totally.unknown"):
        from_official(unmapped, official_args=args)
    wrong = dict(state, **{"query_embed.weight": torch.zeros(3, 64)})
    with pytest.raises(ConversionError, match="shape mismatches.*query_embed"):
        from_official(wrong, official_args=args)


def test_backbone_args_must_match_weights():
    cfg, state = _tiny_official()
    with pytest.raises(ConversionError, match="backbone=resnet50 but the weights are a resnet18"):
        from_official(state, official_args=dict(_official_args(cfg), backbone="resnet50"))


# ----------------------------------------------------------------------------- file formats


class _NotAllowed:
    pass


def test_pickle_with_other_globals_is_refused(tmp_path):
    _, state = _tiny_official()
    path = tmp_path / "evil.pth"
    torch.save({"model": state, "args": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(path)


def test_read_checkpoint_variants(tmp_path):
    _, state = _tiny_official()
    ddp = {"module." + k: v for k, v in state.items()}
    assert set(read_checkpoint({"model": ddp}).state) == set(state)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"args": json.dumps({"nheads": 4})})
    ckpt = read_checkpoint(path)
    assert ckpt.args == {"nheads": 4} and set(ckpt.state) == set(state)


def test_convert_checkpoint_writes_detrkit_format(tmp_path):
    cfg = _variant()
    model = _randomised(cfg)
    official = to_official_state_dict(model.state_dict(), cfg, "detr")
    args = dict(_official_args(cfg), num_classes_override=None)
    del args["num_classes_override"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the class head (5 rows) disagrees with coco's 91
        out = convert_checkpoint({"model": official, "args": args}, tmp_path / "detr_tiny")
    assert out == tmp_path / "detr_tiny.json"
    state, cfg2, label_map, meta = load_checkpoint(tmp_path / "detr_tiny")
    assert meta["extra"]["family"] == "detr" and meta["detrkit_version"]
    assert to_dict(cfg2.model) == to_dict(cfg.model)
    assert label_map.names == [f"class_{i}" for i in range(4)]
    loaded, *_ = load_model(tmp_path / "detr_tiny.safetensors")
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    for got, want in zip(_outputs(loaded, images, mask), _outputs(model, images, mask)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_coco_checkpoint_gets_coco_label_map(tmp_path):
    cfg = _variant(num_classes=91)
    official = to_official_state_dict(build_model(cfg).state_dict(), cfg, "detr")
    args = _official_args(cfg)
    del args["num_classes_override"]
    converted = load_official({"model": official, "args": args})
    assert converted.config.model.num_classes == 91
    assert converted.label_map.names[1] == "person"
