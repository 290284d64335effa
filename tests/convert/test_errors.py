"""Conversion errors name the problem, in every family: weights that do not fit (unexpected,
missing, misshapen keys), alias keys whose values differ, upstream options detrkit does not
have, values that neither the arguments nor the weights give, weights that contradict the
arguments; and a value that cannot be inferred is assumed with a warning naming it."""

from __future__ import annotations

import re
import warnings
from functools import cache
from typing import Any

import pytest
import torch

from detrkit.config import Config
from detrkit.convert import ConversionError, from_official, official_to_config
from detrkit.convert.official import get_converter, to_official_state_dict
from tests.convert.official_cases import (
    CASES,
    DEFAULT_CASES,
    FAMILIES,
    Case,
    case_config,
    model_dict,
    not_in_weights,
    official_args,
    perturbed_model,
)

State = dict[str, torch.Tensor]
CASE_BY_ID = {c.id: c for c in CASES}


@cache
def _official(case: Case) -> tuple[Config, State]:
    """Config and official state dict of ``case`` (perturbed weights; shared by the tests of
    this module, which copy before changing anything)."""
    cfg = case_config(case)
    return cfg, to_official_state_dict(perturbed_model(cfg).state_dict(), cfg, case.code_base)


def _args(family: str, **changes: Any) -> dict[str, Any]:
    """The upstream arguments of the default case of ``family`` with ``changes``."""
    return {**official_args(case_config(DEFAULT_CASES[family])), **changes}


# ----------------------------------------------------------------------------- strict loading


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_that_do_not_fit_are_listed(family: str) -> None:
    """One message lists every unexpected key, every missing model key and every shape
    mismatch (detrkit names, with both shapes)."""
    cfg, official = _official(DEFAULT_CASES[family])
    d, last = cfg.model.transformer.hidden_dim, cfg.model.transformer.dec_layers - 1
    state = dict(official)
    state["totally.unknown"] = torch.zeros(1)
    state["transformer.decoder.layers.0.extra_proj.weight"] = torch.zeros(2)
    del state[f"transformer.decoder.layers.{last}.linear2.weight"]
    state["transformer.decoder.layers.0.linear1.weight"] = torch.zeros(7, d)
    with pytest.raises(ConversionError) as err:
        from_official(state, official_args=official_args(cfg))
    message = str(err.value)
    unexpected = re.search(r"unexpected keys: ([^;]*)", message)
    missing = re.search(r"missing keys: ([^;]*)", message)
    shapes = re.search(r"shape mismatches \(checkpoint vs model\): ([^;]*)", message)
    assert unexpected and missing and shapes, message
    assert unexpected.group(1).split(", ") == [
        "totally.unknown",
        "transformer.decoder.layers.0.extra_proj.weight",
    ]
    assert missing.group(1) == f"transformer.decoder.layers.{last}.linear2.weight"
    ffn = cfg.model.transformer.dim_feedforward
    assert (
        shapes.group(1) == f"transformer.decoder.layers.0.linear1.weight (7, {d}) vs ({ffn}, {d})"
    )


# alias key of the official layout -> case whose model registers it
ALIASES = [
    ("deformable_detr-single_scale", "class_embed.1.weight"),
    ("deformable_detr-3_levels_refine_points", "transformer.decoder.bbox_embed.1.layers.0.bias"),
    ("deformable_detr-two_stage", "transformer.decoder.class_embed.2.bias"),
    ("dab_detr-default", "transformer.decoder.bbox_embed.layers.2.weight"),
    ("dn_dab_detr-default", "transformer.decoder.bbox_embed.layers.0.bias"),
    ("dab_deformable_detr-single_scale", "transformer.decoder.bbox_embed.2.layers.1.weight"),
    ("dino-4scale", "class_embed.2.weight"),
    ("dino-4scale", "transformer.decoder.bbox_embed.1.layers.0.bias"),
    ("dino-separate_heads", "transformer.decoder.class_embed.1.bias"),
    ("dino-shared_encoder_heads", "transformer.enc_out_bbox_embed.layers.2.bias"),
]


@pytest.mark.parametrize("case_id,alias", ALIASES)
def test_alias_with_other_values_is_refused(case_id: str, alias: str) -> None:
    """An official module registered under several names holds one tensor: a checkpoint
    whose alias keys differ was not written by that model."""
    case = CASE_BY_ID[case_id]
    cfg, official = _official(case)
    assert alias in official
    state = dict(official)
    state[alias] = official[alias] + 1.0
    with pytest.raises(ConversionError, match=f"'{re.escape(alias)}' should be the same tensor"):
        get_converter(case.family).from_official(state, cfg)
    state[alias] = official[alias].clone()  # equal values are fine
    mapped, unmatched = get_converter(case.family).from_official(state, cfg)
    assert unmatched == [] and alias not in mapped


# ----------------------------------------------------------------------------- options


UNSUPPORTED = [
    *[(f, "masks", True, "masks=True") for f in FAMILIES],
    *[
        (f, "backbone", "swin_L_384_22k", "backbone 'swin_L_384_22k' is not supported")
        for f in FAMILIES
    ],
    *[
        (f, "position_embedding", "v4", "position_embedding 'v4' is not supported")
        for f in FAMILIES
    ],
    ("deformable_detr", "num_feature_levels", 2, "num_feature_levels=2"),
    ("deformable_detr", "num_feature_levels", 6, "num_feature_levels=6"),
    ("dab_detr", "pre_norm", True, "pre_norm=True"),
    ("dab_detr", "contrastive", True, "contrastive=True"),
    ("dab_detr", "transformer_activation", "selu", "transformer_activation 'selu'"),
    ("dab_deformable_detr", "two_stage", True, "two_stage=True"),
    ("dab_deformable_detr", "num_feature_levels", 2, "num_feature_levels=2"),
    ("dino", "two_stage_type", "enceachlayer", "two_stage_type 'enceachlayer'"),
    ("dino", "transformer_activation", "selu", "transformer_activation 'selu'"),
    ("dino", "two_stage_add_query_num", 10, "two_stage_add_query_num=10"),
    ("dino", "two_stage_pat_embed", 1, "two_stage_pat_embed=1"),
    ("dino", "two_stage_learn_wh", True, "two_stage_learn_wh=True"),
    ("dino", "two_stage_keep_all_tokens", True, "two_stage_keep_all_tokens=True"),
    ("dino", "dec_layer_number", [1, 1, 1], "dec_layer_number="),
    ("dino", "decoder_sa_type", "ca_label", "decoder_sa_type='ca_label'"),
    ("dino", "decoder_module_seq", ["ca", "sa", "ffn"], "decoder_module_seq="),
    ("dino", "use_deformable_box_attn", True, "use_deformable_box_attn=True"),
    ("dino", "add_channel_attention", True, "add_channel_attention=True"),
    ("dino", "unic_layers", 1, "unic_layers=1"),
    ("dino", "pre_norm", True, "pre_norm=True"),
    ("dino", "num_patterns", 2, "num_patterns=2"),
    ("dino", "fix_refpoints_hw", 1, "fix_refpoints_hw=1"),
    ("dino", "query_dim", 2, "query_dim=2"),
]


@pytest.mark.parametrize("family,key,value,match", UNSUPPORTED)
def test_unsupported_upstream_options_are_refused(
    family: str, key: str, value: Any, match: str
) -> None:
    args = _args(family, **{key: value})
    with pytest.raises(ConversionError, match=re.escape(match)):
        official_to_config(args, family=family)
    _, official = _official(DEFAULT_CASES[family])
    with pytest.raises(ConversionError, match=re.escape(match)):  # with weights as well
        official_to_config(args, official)


def test_dn_deformable_detr_with_patterns_is_refused() -> None:
    args = official_args(case_config(CASE_BY_ID["dn_deformable_detr-5_levels"]))
    with pytest.raises(ConversionError, match="num_patterns > 0 is not supported"):
        official_to_config({**args, "num_patterns": 2}, family="dn_deformable_detr")


def test_default_option_values_given_as_tuples_are_accepted() -> None:
    """Namespaces from the DINO config files may hold tuples where the defaults are lists."""
    args = _args("dino", decoder_module_seq=("sa", "ca", "ffn"))
    cfg = official_to_config(args, family="dino")
    assert model_dict(cfg) == model_dict(case_config(DEFAULT_CASES["dino"]))


# ----------------------------------------------------------------------------- missing values


# per family, upstream arguments the architecture needs: without them and without weights the
# conversion must say which value is missing (never build a guessed model)
REQUIRED = [
    (f, k)
    for f in FAMILIES
    for k in ("backbone", "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward")
] + [
    ("detr", "num_queries"),
    ("deformable_detr", "num_queries"),
    ("dab_detr", "num_queries"),
    ("dab_deformable_detr", "num_queries"),
    ("dino", "num_queries"),
    ("deformable_detr", "num_feature_levels"),
    ("dab_deformable_detr", "num_feature_levels"),
    ("dino", "num_feature_levels"),
]


@pytest.mark.parametrize("family,key", REQUIRED)
def test_missing_values_without_weights_are_named(family: str, key: str) -> None:
    args = _args(family)
    del args[key]
    with pytest.raises(ConversionError, match=rf"'[\w/]*\b{key}\b[\w/]*' is missing"):
        official_to_config(args, family=family)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_class_count_is_named(family: str) -> None:
    args = {
        k: v
        for k, v in _args(family).items()
        if k not in ("dataset_file", "num_classes", "num_classes_override", "dn_labelbook_size")
    }
    with pytest.raises(ConversionError, match="num_classes"):
        official_to_config(args, family=family)
    args["dataset_file"] = "coco"  # the official COCO models: 91 class ids
    assert official_to_config(args, family=family).model.num_classes == 91


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_that_contradict_the_arguments(family: str) -> None:
    cfg, official = _official(DEFAULT_CASES[family])
    args = official_args(cfg)
    with pytest.raises(ConversionError, match="backbone=resnet50 but the weights are a resnet18"):
        official_to_config({**args, "backbone": "resnet50"}, official)
    broken = {k: v for k, v in official.items() if not k.startswith("backbone.0.body.layer3.1.")}
    with pytest.raises(ConversionError, match="cannot identify the ResNet"):
        official_to_config({}, broken)
    with pytest.warns(UserWarning, match=f"the class head has {cfg.model.num_classes}"):
        converted = official_to_config(
            {**args, "num_classes_override": 7, "num_classes": 7}, official
        )
    assert converted.model.num_classes == cfg.model.num_classes  # the weights win


@pytest.mark.parametrize("family", ["deformable_detr", "dab_deformable_detr", "dino"])
def test_sampling_points_that_cannot_be_inferred(family: str) -> None:
    """The attention-weight rows are heads * levels * points: a head count that does not
    divide them is an error naming the value to pass."""
    _, official = _official(DEFAULT_CASES[family])
    with pytest.raises(ConversionError, match=r"enc_n_points cannot be inferred.*pass nheads"):
        official_to_config({"nheads": 3, "dilation": False}, official)


def test_dino_projection_width_must_match_a_backbone_stage() -> None:
    _, official = _official(DEFAULT_CASES["dino"])
    state = dict(official)
    weight = state["input_proj.0.0.weight"]
    state["input_proj.0.0.weight"] = torch.zeros(weight.shape[0], 100, 1, 1)
    with pytest.raises(ConversionError, match=r"input_proj.0.0.weight: 100 input channels"):
        official_to_config({"nheads": 2, "dilation": False}, state)


# ----------------------------------------------------------------------------- assumed values


@pytest.mark.parametrize("family", FAMILIES)
def test_values_no_weight_reveals_are_assumed_with_a_warning(family: str) -> None:
    """Without ``nheads`` and ``dilation`` the official defaults (8 heads, no DC5) are
    assumed, each with a warning that names it; everything else comes from the weights."""
    cfg, official = _official(DEFAULT_CASES[family])
    assert cfg.model.transformer.nheads == 8
    args = official_args(cfg)
    hints = {
        k: args[k] for k in not_in_weights(cfg) if k in args and k not in ("nheads", "dilation")
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inferred = official_to_config(hints, official)
    messages = " ".join(str(w.message) for w in caught)
    assert "'nheads'" in messages and "'dilation'" in messages
    assert model_dict(inferred) == model_dict(cfg)


def test_dino_heads_without_weights_or_arguments_are_shared() -> None:
    """Without weights and without ``dec_pred_{class,bbox}_embed_share`` the decoder heads
    follow the upstream DINO default: shared by every layer. Given arguments still decide."""
    args = _args("dino")
    del args["dec_pred_class_embed_share"], args["dec_pred_bbox_embed_share"]
    cfg = official_to_config(args, family="dino")
    assert cfg.model.transformer.dec_layers >= 2  # one layer would be shared either way
    assert (cfg.model.heads.share_decoder_class, cfg.model.heads.share_decoder_box) == (True, True)
    assert model_dict(cfg) == model_dict(case_config(DEFAULT_CASES["dino"]))
    separate = {**args, "dec_pred_class_embed_share": False, "dec_pred_bbox_embed_share": False}
    heads = official_to_config(separate, family="dino").model.heads
    assert (heads.share_decoder_class, heads.share_decoder_box) == (False, False)


@pytest.mark.parametrize(
    "family,key,value,match",
    [
        ("dino", "use_dn", False, "use_dn=False"),
        ("dino", "nms_iou_threshold", 0.8, "nms_iou_threshold"),
        ("dino", "decoder_layer_noise", True, "decoder_layer_noise"),
    ],
)
def test_options_without_effect_on_inference_warn(
    family: str, key: str, value: Any, match: str
) -> None:
    args = _args(family, **{key: value})
    with pytest.warns(UserWarning, match=match):
        cfg = official_to_config(args, family=family)
    assert model_dict(cfg) == model_dict(case_config(DEFAULT_CASES[family]))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_norm_counters_and_distributed_prefixes_are_tolerated(family: str) -> None:
    """``num_batches_tracked`` buffers (a backbone saved with ordinary batch norm) are dropped;
    a ``module.`` prefix on every key (DistributedDataParallel) is removed."""
    case = DEFAULT_CASES[family]
    cfg, official = _official(case)
    state = {**official, "backbone.0.body.bn1.num_batches_tracked": torch.tensor(7)}
    mapped, unmatched = get_converter(case.family).from_official(state, cfg)
    assert unmatched == [] and not any(k.endswith("num_batches_tracked") for k in mapped)
    converted = from_official(
        {"module." + k: v for k, v in state.items()}, official_args=official_args(cfg)
    )
    assert sorted(converted.state_dict()) == sorted(mapped)
