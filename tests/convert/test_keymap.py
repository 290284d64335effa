"""The conversion machinery shared by every family: key rules, alias handling, family
detection, the shared argument helpers (backbone depth, class count, COCO label map, training
arguments), checkpoint files (``.pth`` with stored arguments, safetensors, refused pickles)
and ``detrkit.api.convert_checkpoint``. Family-specific behaviour is in ``test_round_trip``,
``test_full_size`` and ``test_errors``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from detrkit.api import convert_checkpoint
from detrkit.config import to_dict
from detrkit.convert import (
    ConversionError,
    coco_label_map,
    detect_family,
    from_official,
    load_official,
    official_to_config,
    read_checkpoint,
    to_official_state_dict,
)
from detrkit.convert.keymap import KeyRule, drop_aliases, rename
from detrkit.convert.official import apply_training_args, infer_backbone, resolve_num_classes
from detrkit.engine.checkpoint import load_checkpoint, load_model
from detrkit.models import DetectionModel, build_model
from detrkit.models.backbone import ResNetBackbone
from detrkit.presets import get_preset
from tests.conftest import fixtures_dir, padded_batch
from tests.convert.official_cases import (
    DEFAULT_CASES,
    FAMILIES,
    case_config,
    model_dict,
    official_args,
    perturbed_model,
)

KEYS_FULL_SIZE = fixtures_dir() / "keys_full_size.json"
needs_keys = pytest.mark.skipif(
    not KEYS_FULL_SIZE.is_file(), reason="keys_full_size.json not available"
)


# ----------------------------------------------------------------------------- key rules


def test_key_rule_placeholders_and_reverse() -> None:
    rule = KeyRule(
        "transformer.decoder.layers.{n}.multihead_attn.",
        "transformer.decoder.layers.{n}.cross_attn.",
    )
    assert (
        rule.apply("transformer.decoder.layers.11.multihead_attn.out_proj.weight")
        == "transformer.decoder.layers.11.cross_attn.out_proj.weight"
    )
    assert rule.apply("transformer.decoder.layers.1.self_attn.in_proj_weight") is None
    assert (
        rule.apply("transformer.decoder.layers.3.cross_attn.in_proj_bias", reverse=True)
        == "transformer.decoder.layers.3.multihead_attn.in_proj_bias"
    )
    two = KeyRule("input_proj.{level}.{part}.", "neck.layers.{level}.{part}.")
    assert two.apply("input_proj.3.1.weight") == "neck.layers.3.1.weight"
    assert two.apply("neck.layers.12.0.bias", reverse=True) == "input_proj.12.0.bias"
    exact = KeyRule("transformer.level_embed", "transformer.level_embed")
    assert exact.apply("transformer.level_embed") == "transformer.level_embed"
    assert exact.apply("transformer.level_embed_x") is None
    layer = KeyRule("layers.1", "blocks.1")  # "layers.1" must not match "layers.10"
    assert layer.apply("layers.10.weight") is None
    assert layer.apply("layers.1.weight") == "blocks.1.weight"


def test_rename_reports_unmatched_ignores_and_collisions() -> None:
    state = {
        "a.x": torch.zeros(1),
        "b.y": torch.zeros(1),
        "a.bn.num_batches_tracked": torch.zeros(1),
    }
    out, unmatched = rename(state, [KeyRule("a.", "z.")], ignore=[r"num_batches_tracked$"])
    assert set(out) == {"z.x"} and unmatched == ["b.y"]
    with pytest.raises(ConversionError, match=r"two keys map to 'z\.x'"):
        rename(
            {"a.x": torch.zeros(1), "b.x": torch.zeros(1)},
            [KeyRule("a.", "z."), KeyRule("b.", "z.")],
        )


def test_drop_aliases() -> None:
    t = torch.arange(4.0)
    state = {"bbox_embed.0.w": t, "bbox_embed.1.w": t.clone()}
    drop_aliases(state, {"bbox_embed.1.w": "bbox_embed.0.w"}, "ckpt")
    assert set(state) == {"bbox_embed.0.w"}
    only_alias = {"c.1": t}  # an alias without its canonical key takes its place
    drop_aliases(only_alias, {"c.1": "c.0"}, "ckpt")
    assert set(only_alias) == {"c.0"}
    for bad in ({"c.0": t, "c.1": t + 1}, {"c.0": t, "c.1": t[:2]}):
        with pytest.raises(ConversionError, match=r"ckpt: 'c\.1' should be the same tensor"):
            drop_aliases(bad, {"c.1": "c.0"}, "ckpt")


# ----------------------------------------------------------------------------- detection


@needs_keys
def test_detect_family_of_every_published_layout() -> None:
    models = json.loads(KEYS_FULL_SIZE.read_text())["models"]
    for name, info in models.items():
        state = {k: torch.empty(0) for k in info["keys"]}
        assert detect_family(state) == info["family"], name


def test_detect_family_from_arguments_alone() -> None:
    for modelname, family in (
        ("dino", "dino"),
        ("dab_detr", "dab_detr"),
        ("dn_dab_detr", "dn_dab_detr"),
        ("dab_deformable_detr", "dab_deformable_detr"),
        ("dn_dab_deformable_detr", "dn_deformable_detr"),
    ):
        assert detect_family({}, {"modelname": modelname}) == family
    assert detect_family({}, {"num_feature_levels": 4}) == "deformable_detr"
    assert detect_family({}, {"hidden_dim": 256}) == "detr"
    with pytest.raises(ConversionError, match="unknown modelname 'yolo'"):
        detect_family({}, {"modelname": "yolo"})


@needs_keys
@pytest.mark.parametrize("preset", ["detr_r50", "detr_r50_dc5", "detr_r101"])
def test_full_size_detr_presets_write_the_official_key_layout(preset: str) -> None:
    """DETR-DC5 has the keys of DETR; R101 differs only in ``layer3`` (23 bottleneck blocks of
    3 convolutions and 3 frozen batch norms with 4 tensors each, plus the downsampling)."""
    info = json.loads(KEYS_FULL_SIZE.read_text())["models"]["detr_r50"]
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = build_model(cfg)
    official = {
        k: list(v.shape) for k, v in to_official_state_dict(model.state_dict(), cfg, "detr").items()
    }
    expected = {k: v["shape"] for k, v in info["keys"].items()}
    if preset == "detr_r101":
        layer3 = "backbone.0.body.layer3."
        assert sum(k.startswith(layer3) for k in official) == 23 * (3 + 3 * 4) + (1 + 4)
        official = {k: v for k, v in official.items() if not k.startswith(layer3)}
        expected = {k: v for k, v in expected.items() if not k.startswith(layer3)}
    assert official == expected


def test_unknown_families_and_incomplete_checkpoints() -> None:
    with pytest.raises(ConversionError, match="cannot tell"):
        detect_family({"foo.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="segmentation"):
        detect_family({"detr.query_embed.weight": torch.zeros(1)})
    dino_like = {"transformer.tgt_embed.weight": torch.zeros(1), "label_enc.weight": torch.zeros(1)}
    assert detect_family(dino_like) == "dino"
    with pytest.raises(ConversionError, match="ResNet"):  # a DINO key set without a backbone
        from_official(dino_like)
    with pytest.raises(ConversionError, match="unknown model family 'yolo'"):
        from_official({"query_embed.weight": torch.zeros(1)}, family="yolo")


# ----------------------------------------------------------------------------- shared helpers


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_infer_backbone_depth(name: str) -> None:
    with torch.device("meta"):
        body = ResNetBackbone(name).body.state_dict()
    assert infer_backbone({f"backbone.0.body.{k}": v for k, v in body.items()}) == name


def test_num_classes_resolution() -> None:
    assert resolve_num_classes({"dataset_file": "coco"}, 91) == 91
    assert resolve_num_classes({"dataset_file": "coco", "num_classes_override": 7}, 7) == 7
    assert resolve_num_classes({"dataset_file": "coco"}, None) == 91
    assert resolve_num_classes({"dataset_file": "coco_panoptic"}, None) == 250
    assert resolve_num_classes({"num_classes": 3, "num_classes_override": 4}, None) == 4
    assert resolve_num_classes({}, 12) == 12
    with pytest.warns(UserWarning, match="class head has 20"):
        assert resolve_num_classes({"dataset_file": "coco"}, 20) == 20
    with pytest.raises(ConversionError, match="cannot determine num_classes"):
        resolve_num_classes({}, None)


def test_coco_label_map() -> None:
    lm = coco_label_map()
    assert len(lm) == 91 and lm.category_ids[17] == 17
    assert (lm.names[1], lm.names[18], lm.names[90], lm.names[0], lm.names[12]) == (
        "person",
        "dog",
        "toothbrush",
        "N/A",
        "N/A",
    )
    assert sum(n != "N/A" for n in lm.names) == 80


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_arguments(family: str) -> None:
    """``lr_backbone <= 0`` freezes the whole ResNet (the official ``train_backbone``), else the
    stem and layer1 as torchvision's official models; DC5 from ``dilation``; the weights come
    from the checkpoint, never downloaded."""
    args = official_args(case_config(DEFAULT_CASES[family]))
    for lr_backbone, frozen in ((0.0, 4), (-1.0, 4), (1e-5, 1), (None, 1)):
        cfg = official_to_config({**args, "lr_backbone": lr_backbone}, family=family)
        assert cfg.model.backbone.frozen_stages == frozen
        assert cfg.model.backbone.pretrained is False
    cfg = official_to_config({**args, "backbone": "resnet101", "dilation": True}, family=family)
    assert (cfg.model.backbone.name, cfg.model.backbone.dilation) == ("resnet101", True)


def test_official_to_config_from_args_only() -> None:
    args = {
        "backbone": "resnet101",
        "dilation": True,
        "position_embedding": "sine",
        "hidden_dim": 256,
        "nheads": 8,
        "enc_layers": 6,
        "dec_layers": 6,
        "dim_feedforward": 2048,
        "dropout": 0.1,
        "pre_norm": False,
        "num_queries": 100,
        "aux_loss": True,
        "dataset_file": "coco",
        "eos_coef": 0.1,
        "lr_drop": 200,
        "epochs": 300,
        "set_cost_class": 1,
    }
    cfg = official_to_config(argparse.Namespace(**args))
    assert to_dict(cfg.model) == to_dict(get_preset("detr_r101_dc5").model)
    assert (cfg.train.epochs, cfg.train.lr_drop, cfg.loss.eos_coef) == (300, 200, 0.1)


def test_training_args_of_every_family_reach_the_config() -> None:
    official = {
        "set_cost_class": 3,
        "set_cost_bbox": 4,
        "set_cost_giou": 5,
        "cls_loss_coef": 6,
        "bbox_loss_coef": 7,
        "giou_loss_coef": 8,
        "eos_coef": 0.3,
        "focal_alpha": 0.4,
        "lr": 1e-3,
        "lr_backbone": 1e-4,
        "lr_linear_proj_mult": 0.5,
        "weight_decay": 0.05,
        "clip_max_norm": 0.2,
        "epochs": 9,
        "lr_drop": 7,
        "batch_size": 3,
        "unrelated": "ignored",
    }
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


# ----------------------------------------------------------------------------- files


def _detections(model: DetectionModel) -> tuple[torch.Tensor, torch.Tensor]:
    images, mask = padded_batch([(48, 40), (40, 48)])
    with torch.no_grad():
        out = model(images, mask)
    return out.logits, out.boxes


@pytest.fixture(scope="module")
def detr_official() -> dict[str, torch.Tensor]:
    cfg = case_config(DEFAULT_CASES["detr"])
    return to_official_state_dict(build_model(cfg).state_dict(), cfg, "detr")


class _NotAllowed:
    pass


def test_pickle_with_other_globals_is_refused(
    tmp_path: Path, detr_official: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": detr_official, "args": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(path)


def test_read_checkpoint_variants(tmp_path: Path, detr_official: dict[str, torch.Tensor]) -> None:
    state = detr_official
    ddp = {"module." + k: v for k, v in state.items()}
    assert set(read_checkpoint({"model": ddp}).state) == set(state)
    assert set(read_checkpoint({"state_dict": state}).state) == set(state)
    assert read_checkpoint(dict(state)).args is None
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not tensors"):
        read_checkpoint({"model": {"a": 1}})
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"args": json.dumps({"nheads": 4})})
    ckpt = read_checkpoint(path)
    assert ckpt.args == {"nheads": 4} and set(ckpt.state) == set(state)
    save_file(state, str(path), metadata={"args": "{not json"})
    with pytest.raises(ValueError, match="metadata 'args' is not valid JSON"):
        read_checkpoint(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_checkpoint_of_a_pth_with_stored_args(tmp_path: Path, family: str) -> None:
    """An official ``.pth`` (weights + ``argparse.Namespace``) becomes a detrkit checkpoint
    whose model, config, label map and metadata are those of the original."""
    case = DEFAULT_CASES[family]
    cfg = case_config(case)
    ours = perturbed_model(cfg).state_dict()
    official = to_official_state_dict(ours, cfg, case.code_base)
    src = tmp_path / "official.pth"
    torch.save(
        {"model": official, "args": argparse.Namespace(**official_args(cfg)), "epoch": 49}, src
    )
    out = convert_checkpoint(src, tmp_path / "converted")
    assert out == tmp_path / "converted.json"
    state, cfg2, label_map, meta = load_checkpoint(tmp_path / "converted")
    assert meta["extra"]["family"] == case.family and meta["detrkit_version"]
    assert meta["extra"]["source"] == str(src)
    assert model_dict(cfg2) == model_dict(cfg)
    assert label_map.names == [f"class_{i}" for i in range(cfg.model.num_classes)]
    assert sorted(state) == sorted(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)


def test_converted_checkpoint_loads_as_the_same_model(tmp_path: Path) -> None:
    cfg = case_config(DEFAULT_CASES["dino"])
    model = perturbed_model(cfg)
    official = to_official_state_dict(model.state_dict(), cfg, "dino")
    convert_checkpoint({"model": official}, tmp_path / "dino", official_args(cfg))
    loaded, *_ = load_model(tmp_path / "dino.safetensors")
    for got, want in zip(_detections(loaded), _detections(model)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_given_args_override_the_stored_ones() -> None:
    cfg = case_config(DEFAULT_CASES["detr"])
    official = to_official_state_dict(build_model(cfg).state_dict(), cfg, "detr")
    stored = {**official_args(cfg), "dropout": 0.3, "lr": 5e-4}
    converted = load_official(
        {"model": official, "args": stored}, official_args=argparse.Namespace(dropout=0.2)
    )
    assert converted.config.model.transformer.dropout == 0.2
    assert converted.config.train.lr == 5e-4 and converted.args["dropout"] == 0.2


def test_coco_checkpoint_gets_the_coco_label_map() -> None:
    cfg = case_config(DEFAULT_CASES["detr"])
    cfg.model.num_classes = 91
    official = to_official_state_dict(build_model(cfg).state_dict(), cfg, "detr")
    args = official_args(cfg)
    del args["num_classes_override"]
    converted = load_official({"model": official, "args": args})
    assert converted.config.model.num_classes == 91
    assert converted.label_map.names[1] == "person"
