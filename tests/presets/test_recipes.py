"""The presets of the published systems follow the official recipes: architecture, loss,
post-processing and schedule of each upstream repository's defaults, the parameter count of
the official full-size models, and tiny variants that change only sizes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torchvision

from detrkit.config import Config, to_dict
from detrkit.models import build_model
from detrkit.presets import get_preset, list_presets
from tests.conftest import fixtures_dir

KEYS_FULL_SIZE = fixtures_dir() / "keys_full_size.json"

_DETR_SCHEDULE = {
    "train.lr": 1e-4,
    "train.lr_backbone": 1e-5,
    "train.batch_size": 2,
    "train.weight_decay": 1e-4,
    "train.epochs": 300,
    "train.lr_drop": 200,
    "train.clip_max_norm": 0.1,
}
_DETR = {
    "model.num_classes": 91,
    "model.class_activation": "softmax",
    "model.aux_loss": True,
    "model.backbone.frozen_stages": 1,
    "model.backbone.norm": "frozen_bn",
    "model.neck.norm": "none",
    "model.position.kind": "sine",
    "model.position.offset": 0.0,
    "model.position.temperature_h": 10000.0,
    "model.position.normalize": True,
    "model.transformer.attention": "global",
    "model.transformer.hidden_dim": 256,
    "model.transformer.nheads": 8,
    "model.transformer.enc_layers": 6,
    "model.transformer.dec_layers": 6,
    "model.transformer.dim_feedforward": 2048,
    "model.transformer.dropout": 0.1,
    "model.transformer.activation": "relu",
    "model.transformer.pre_norm": False,
    "model.transformer.decoder_norm": True,
    "model.queries.kind": "learned",
    "model.queries.num_queries": 100,
    "model.denoising.kind": "none",
    "loss.class_loss": "ce",
    "loss.eos_coef": 0.1,
    "loss.class_weight": 1.0,
    "loss.bbox_weight": 5.0,
    "loss.giou_weight": 2.0,
    "loss.matcher.cost_class": 1.0,
    "loss.matcher.cost_bbox": 5.0,
    "loss.matcher.cost_giou": 2.0,
    "postprocess.num_select": None,
    **_DETR_SCHEDULE,
}
# fundamentalvision/Deformable-DETR main.py defaults
_DEFORMABLE = {
    "model.num_classes": 91,
    "model.class_activation": "sigmoid",
    "model.backbone.name": "resnet50",
    "model.neck.norm": "group_norm",
    "model.position.kind": "sine",
    "model.position.offset": 0.5,
    "model.transformer.attention": "deformable",
    "model.transformer.hidden_dim": 256,
    "model.transformer.nheads": 8,
    "model.transformer.enc_layers": 6,
    "model.transformer.dec_layers": 6,
    "model.transformer.dim_feedforward": 1024,
    "model.transformer.dropout": 0.1,
    "model.transformer.enc_n_points": 4,
    "model.transformer.dec_n_points": 4,
    "model.transformer.decoder_norm": False,
    "model.queries.num_queries": 300,
    "model.queries.inverse_sigmoid_eps": 1e-5,
    "model.denoising.kind": "none",
    "loss.class_loss": "focal",
    "loss.focal_alpha": 0.25,
    "loss.class_weight": 2.0,
    "loss.bbox_weight": 5.0,
    "loss.giou_weight": 2.0,
    "loss.matcher.cost_class": 2.0,
    "loss.matcher.cost_bbox": 5.0,
    "loss.matcher.cost_giou": 2.0,
    "postprocess.num_select": 100,
    "train.lr": 2e-4,
    "train.lr_backbone": 2e-5,
    "train.lr_linear_proj_mult": 0.1,
    "train.batch_size": 2,
    "train.weight_decay": 1e-4,
    "train.epochs": 50,
    "train.lr_drop": 40,
    "train.clip_max_norm": 0.1,
}
_ONE_HEAD = {"model.heads.share_decoder_class": True, "model.heads.share_decoder_box": True}
_HEAD_PER_LAYER = {"model.heads.share_decoder_class": False, "model.heads.share_decoder_box": False}
# IDEA-Research/DAB-DETR (-m dab_detr) and DN-DETR (-m dn_dab_detr --use_dn) defaults
_DAB = {
    "model.num_classes": 91,
    "model.class_activation": "sigmoid",
    "model.backbone.name": "resnet50",
    "model.neck.norm": "none",
    "model.position.temperature_h": 20.0,
    "model.position.temperature_w": 20.0,
    "model.position.offset": 0.0,
    "model.transformer.attention": "global",
    "model.transformer.hidden_dim": 256,
    "model.transformer.nheads": 8,
    "model.transformer.enc_layers": 6,
    "model.transformer.dec_layers": 6,
    "model.transformer.dim_feedforward": 2048,
    "model.transformer.dropout": 0.0,
    "model.transformer.activation": "prelu",
    "model.transformer.pre_norm": False,
    "model.transformer.conditional_attention": True,
    "model.transformer.encoder_query_scale": True,
    "model.transformer.decoder_query_scale": True,
    "model.transformer.modulate_hw_attn": True,
    # the official decoder predicts each layer's boxes from the undetached refined anchor of
    # the layer before (detaching only the next layer's input): look forward twice
    "model.queries.kind": "anchors",
    "model.queries.box_update": "look_forward_twice",
    "model.queries.num_queries": 300,
    "model.queries.num_patterns": 0,
    "model.queries.inverse_sigmoid_eps": 1e-3,
    **_ONE_HEAD,
    "loss.class_loss": "focal",
    "loss.class_weight": 1.0,
    "loss.bbox_weight": 5.0,
    "loss.giou_weight": 2.0,
    "loss.matcher.cost_class": 2.0,
    "loss.matcher.cost_bbox": 5.0,
    "loss.matcher.cost_giou": 2.0,
    "postprocess.num_select": 300,
    "train.lr": 1e-4,
    "train.lr_backbone": 1e-5,
    "train.batch_size": 2,
    "train.epochs": 50,
    "train.lr_drop": 40,
    "train.clip_max_norm": 0.1,
}
# DN-DETR: 5 denoising groups, label noise 0.2, box noise 0.4; "unknown"-label content
_DN = {
    "model.denoising.kind": "dn",
    "model.denoising.dn_number": 5,
    "model.denoising.label_noise_ratio": 0.2,
    "model.denoising.box_noise_scale": 0.4,
    "model.denoising.content_indicator": True,
}
# DAB-Deformable-DETR (DAB-DETR -m dab_deformable_detr) / DN-Deformable-DETR
_DAB_DEFORMABLE = {
    **_DEFORMABLE,
    **_HEAD_PER_LAYER,
    "model.queries.kind": "anchors",
    "model.queries.box_update": "refine",
    "model.queries.content": "learned",
    "model.queries.inverse_sigmoid_eps": 1e-3,
    "model.transformer.num_feature_levels": 4,
    "model.transformer.dim_feedforward": 2048,
    "model.transformer.dropout": 0.0,
    "model.transformer.decoder_query_scale": True,
    "model.position.temperature_h": 10000.0,
    "loss.class_weight": 1.0,
    "train.lr": 1e-4,
    "train.lr_backbone": 1e-5,
    "train.lr_linear_proj_mult": 1.0,
}
# IDEA-Research/DINO config/DINO/DINO_4scale.py / DINO_5scale.py
_DINO = {
    **_DEFORMABLE,
    **_ONE_HEAD,
    "model.heads.share_encoder_class": False,
    "model.heads.share_encoder_box": False,
    "model.queries.kind": "mixed",
    "model.queries.box_update": "look_forward_twice",
    "model.queries.num_queries": 900,
    "model.queries.content": "learned",
    "model.queries.inverse_sigmoid_eps": 1e-3,
    "model.denoising.kind": "cdn",
    "model.denoising.dn_number": 100,
    "model.denoising.label_noise_ratio": 0.5,
    "model.denoising.box_noise_scale": 0.4,
    "model.denoising.labelbook_size": None,
    "model.denoising.content_indicator": False,
    "model.transformer.dim_feedforward": 2048,
    "model.transformer.dropout": 0.0,
    "model.transformer.decoder_norm": True,
    "model.transformer.decoder_query_scale": False,
    "model.position.temperature_h": 20.0,
    "model.position.temperature_w": 20.0,
    "model.position.offset": 0.0,
    "loss.class_weight": 1.0,
    "postprocess.num_select": 300,
    "train.lr": 1e-4,
    "train.lr_backbone": 1e-5,
    "train.lr_linear_proj_mult": 0.1,
    "train.epochs": 12,
    "train.lr_drop": 11,
}

RECIPES: dict[str, dict[str, Any]] = {
    "detr_r50": {**_DETR, "model.backbone.name": "resnet50", "model.backbone.dilation": False},
    "detr_r50_dc5": {**_DETR, "model.backbone.name": "resnet50", "model.backbone.dilation": True},
    "detr_r101": {**_DETR, "model.backbone.name": "resnet101", "model.backbone.dilation": False},
    "detr_r101_dc5": {**_DETR, "model.backbone.name": "resnet101", "model.backbone.dilation": True},
    "deformable_detr_r50": {
        **_DEFORMABLE,
        **_ONE_HEAD,
        "model.transformer.num_feature_levels": 4,
        "model.queries.kind": "reference_points",
        "model.queries.content": "learned",
        "model.queries.box_update": "none",
        "model.backbone.dilation": False,
    },
    "deformable_detr_r50_single_scale": {
        **_DEFORMABLE,
        **_ONE_HEAD,
        "model.transformer.num_feature_levels": 1,
        "model.queries.kind": "reference_points",
        "model.queries.box_update": "none",
        "model.backbone.dilation": False,
    },
    "deformable_detr_r50_single_scale_dc5": {
        **_DEFORMABLE,
        **_ONE_HEAD,
        "model.transformer.num_feature_levels": 1,
        "model.queries.kind": "reference_points",
        "model.queries.box_update": "none",
        "model.backbone.dilation": True,
    },
    "deformable_detr_r50_refine": {
        **_DEFORMABLE,
        **_HEAD_PER_LAYER,
        "model.transformer.num_feature_levels": 4,
        "model.queries.kind": "reference_points",
        "model.queries.box_update": "refine",
    },
    "deformable_detr_r50_two_stage": {
        **_DEFORMABLE,
        **_HEAD_PER_LAYER,
        "model.transformer.num_feature_levels": 4,
        "model.queries.kind": "two_stage",
        "model.queries.box_update": "refine",
        "model.queries.content": "proposal",
        "model.heads.share_encoder_class": False,
        "model.heads.share_encoder_box": False,
    },
    "dab_detr_r50": {**_DAB, "model.denoising.kind": "none", "model.queries.content": "zero"},
    "dn_detr_r50": {**_DAB, **_DN, "model.queries.content": "label"},
    "dab_deformable_detr_r50": {**_DAB_DEFORMABLE, "model.denoising.kind": "none"},
    "dn_deformable_detr_r50": {**_DAB_DEFORMABLE, **_DN},
    "dino_4scale_r50": {
        **_DINO,
        "model.transformer.num_feature_levels": 4,
        "model.backbone.levels": None,
    },
    "dino_5scale_r50": {
        **_DINO,
        "model.transformer.num_feature_levels": 5,
        "model.backbone.levels": [1, 2, 3, 4],
    },  # C2-C5 + one strided level
}

# unique parameters and buffers of the official full-size models (keys_full_size.json); the
# DC5 variants have the weights of their stride-32 models
OFFICIAL_COUNTS: dict[str, tuple[str, int]] = {
    "detr_r50": ("detr_r50", 41_631_008),
    "detr_r50_dc5": ("detr_r50", 41_631_008),
    "deformable_detr_r50": ("deformable_detr_r50", 40_175_905),
    "deformable_detr_r50_single_scale": ("deformable_detr_r50_single_scale", 34_172_833),
    "deformable_detr_r50_single_scale_dc5": ("deformable_detr_r50_single_scale", 34_172_833),
    "deformable_detr_r50_refine": ("deformable_detr_r50_refine", 40_955_900),
    "deformable_detr_r50_two_stage": ("deformable_detr_r50_twostage_refine", 41_287_769),
    "dab_detr_r50": ("dab_detr_r50", 43_777_757),
    "dn_detr_r50": ("dn_dab_detr_r50", 43_801_217),
    "dab_deformable_detr_r50": ("dab_deformable_detr_r50", 47_512_234),
    "dn_deformable_detr_r50": ("dn_deformable_detr_r50", 47_535_394),
    "dino_4scale_r50": ("dino_4scale_r50", 46_999_422),
    "dino_5scale_r50": ("dino_5scale_r50", 47_362_046),
}

# tiny preset -> the full-size preset whose switches it keeps (only sizes change)
TINY_OF = {
    "test_detr_tiny": "detr_r50",
    "test_deformable_detr_tiny": "deformable_detr_r50",
    "test_deformable_detr_tiny_single_scale": "deformable_detr_r50_single_scale",
    "test_deformable_detr_tiny_refine": "deformable_detr_r50_refine",
    "test_deformable_detr_tiny_two_stage": "deformable_detr_r50_two_stage",
    "test_dab_detr_tiny": "dab_detr_r50",
    "test_dn_detr_tiny": "dn_detr_r50",
    "test_dab_deformable_detr_tiny": "dab_deformable_detr_r50",
    "test_dn_deformable_detr_tiny": "dn_deformable_detr_r50",
    "test_dino_tiny": "dino_4scale_r50",
    "test_dino_tiny_5scale": "dino_5scale_r50",
}
SIZE_FIELDS = {
    "backbone.name",
    "num_classes",
    "transformer.hidden_dim",
    "transformer.nheads",
    "transformer.enc_layers",
    "transformer.dec_layers",
    "transformer.dim_feedforward",
    "transformer.dropout",
    "queries.num_queries",
    "denoising.dn_number",
}


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _count(name: str) -> int:
    with torch.device("meta"):
        model = build_model(get_preset(name))
    return sum(v.numel() for v in model.state_dict().values())


def test_every_published_system_and_tiny_variant_is_registered() -> None:
    assert set(list_presets()) == set(RECIPES) | set(TINY_OF)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_follows_the_official_recipe(name: str) -> None:
    cfg = get_preset(name)
    wrong = {
        key: (_get(cfg, key), value)
        for key, value in RECIPES[name].items()
        if _get(cfg, key) != value
    }
    assert wrong == {}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_full_size_preset_has_the_official_parameter_count(name: str) -> None:
    official, count = OFFICIAL_COUNTS[name]
    if KEYS_FULL_SIZE.is_file():  # the table above is the shared file's
        spec = json.loads(KEYS_FULL_SIZE.read_text())["models"][official]
        assert spec["num_unique_parameters_and_buffers"] == count
    assert _count(name) == count


@pytest.mark.parametrize("name", ["detr_r101", "detr_r101_dc5"])
def test_detr_r101_adds_the_extra_resnet101_blocks(name: str) -> None:
    """No official count is published for DETR-R101; it is DETR-R50's plus the difference of
    the torchvision ResNets (frozen batch norm: no ``num_batches_tracked``)."""

    def resnet(depth: int) -> int:
        with torch.device("meta"):
            net = getattr(torchvision.models, f"resnet{depth}")()
        return sum(
            v.numel()
            for k, v in net.state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
        )

    assert _count(name) == OFFICIAL_COUNTS["detr_r50"][1] + resnet(101) - resnet(50)


@pytest.mark.parametrize("tiny", sorted(TINY_OF))
def test_tiny_preset_only_shrinks_its_published_system(tiny: str) -> None:
    small = _flat(to_dict(get_preset(tiny).model))
    full = _flat(to_dict(get_preset(TINY_OF[tiny]).model))
    changed = {k for k in full if small[k] != full[k]}
    assert changed <= SIZE_FIELDS, changed - SIZE_FIELDS
    assert small["backbone.name"] == "resnet18" and small["transformer.hidden_dim"] == 64
