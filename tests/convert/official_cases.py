"""What the converter tests share: small detrkit configurations of every official family, the
official arguments that describe them (written here from the upstream argument names, not by
the converters), and perturbed weights.

A :class:`Case` is a small detrkit config (a tiny preset shrunk by
:func:`tests.conftest.small_config`, plus overrides) that one upstream code base can build.
:func:`official_args` writes the upstream ``args`` of that model, so a conversion round trip
checks the converters against an independent description of each family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from detrkit.config import Config, PositionConfig, to_dict
from detrkit.models import DetectionModel, build_model
from detrkit.models.detector import backbone_levels
from tests.conftest import small_config

__all__ = [
    "CASES",
    "DEFAULT_CASES",
    "DINO_FIXED_OPTIONS",
    "FAMILIES",
    "Case",
    "case_config",
    "case_params",
    "family_of",
    "model_dict",
    "not_in_weights",
    "official_args",
    "perturbed_model",
]

# the five upstream code bases (DN variants share their DAB converter)
FAMILIES = ("detr", "deformable_detr", "dab_detr", "dab_deformable_detr", "dino")


@dataclass(frozen=True)
class Case:
    """A small model of ``family`` (the family detection must find, DN variants included):
    ``preset`` shrunk by :func:`small_config`, then ``overrides``."""

    family: str
    name: str
    preset: str
    overrides: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"

    @property
    def code_base(self) -> str:
        """The family of :data:`FAMILIES` (the upstream repository) of this case."""
        return {"dn_dab_detr": "dab_detr", "dn_deformable_detr": "dab_deformable_detr"}.get(
            self.family, self.family
        )


def _c(family: str, name: str, preset: str, *overrides: str) -> Case:
    return Case(family, name, preset, overrides)


_MQ = "model.queries"
_MT = "model.transformer"
_MH = "model.heads"
# the first case of each code base has the official head count (8, the value assumed when
# the arguments lack it)
_8_HEADS = f"{_MT}.nheads=8"

CASES: tuple[Case, ...] = (
    # DETR: post-norm / pre-norm, sine / learned position, no encoder, other depths, ResNets
    _c("detr", "default", "test_detr_tiny", _8_HEADS),
    _c(
        "detr",
        "pre_norm_learned_position",
        "test_detr_tiny",
        f"{_MT}.pre_norm=true",
        "model.position.kind=learned",
    ),
    _c(
        "detr",
        "pre_norm_no_encoder",
        "test_detr_tiny",
        f"{_MT}.pre_norm=true",
        f"{_MT}.enc_layers=0",
    ),
    _c(
        "detr",
        "r34_deep_no_aux",
        "test_detr_tiny",
        "model.backbone.name=resnet34",
        f"{_MT}.enc_layers=3",
        f"{_MT}.dec_layers=4",
        f"{_MT}.nheads=8",
        "model.aux_loss=false",
    ),
    _c(
        "detr",
        "r50_dc5_counts",
        "test_detr_tiny",
        "model.backbone.name=resnet50",
        "model.backbone.dilation=true",
        f"{_MQ}.num_queries=7",
        f"{_MT}.dim_feedforward=48",
        "model.num_classes=2",
    ),
    # Deformable DETR: levels 1 / 3 / 4 / 5, refinement, two-stage with and without it
    _c("deformable_detr", "single_scale", "test_deformable_detr_tiny_single_scale", _8_HEADS),
    _c(
        "deformable_detr",
        "3_levels_refine_points",
        "test_deformable_detr_tiny_refine",
        f"{_MT}.num_feature_levels=3",
        f"{_MT}.enc_n_points=2",
        f"{_MT}.dec_n_points=3",
    ),
    _c(
        "deformable_detr",
        "two_stage",
        "test_deformable_detr_tiny_two_stage",
        f"{_MQ}.box_update=none",
        f"{_MH}.share_decoder_class=true",
        f"{_MH}.share_decoder_box=true",
        f"{_MH}.share_encoder_class=true",
        f"{_MH}.share_encoder_box=true",
    ),
    _c(
        "deformable_detr",
        "5_levels_two_stage_refine_learned_position",
        "test_deformable_detr_tiny_two_stage",
        f"{_MT}.num_feature_levels=5",
        "model.position.kind=learned",
    ),
    # DAB-DETR / DN-DETR (single scale, conditional attention)
    _c("dab_detr", "default", "test_dab_detr_tiny", _8_HEADS),
    _c(
        "dab_detr",
        "patterns_random_anchors_gelu_learned_position",
        "test_dab_detr_tiny",
        f"{_MQ}.num_patterns=2",
        f"{_MQ}.random_refpoints_xy=true",
        f"{_MT}.activation=gelu",
        "model.position.kind=learned",
    ),
    _c("dn_dab_detr", "default", "test_dn_detr_tiny"),
    _c(
        "dn_dab_detr",
        "noise_relu_temperatures",
        "test_dn_detr_tiny",
        "model.denoising.dn_number=4",
        "model.denoising.label_noise_ratio=0.3",
        "model.denoising.box_noise_scale=0.5",
        f"{_MT}.activation=relu",
        "model.position.temperature_h=30",
        "model.position.temperature_w=40",
    ),
    # DAB- / DN-Deformable-DETR
    _c(
        "dab_deformable_detr",
        "single_scale",
        "test_dab_deformable_detr_tiny",
        f"{_MT}.num_feature_levels=1",
        _8_HEADS,
    ),
    _c(
        "dab_deformable_detr",
        "patterns_points",
        "test_dab_deformable_detr_tiny",
        f"{_MQ}.num_patterns=2",
        f"{_MT}.enc_n_points=2",
        f"{_MT}.dec_n_points=3",
    ),
    _c(
        "dn_deformable_detr",
        "3_levels_noise",
        "test_dn_deformable_detr_tiny",
        f"{_MT}.num_feature_levels=3",
        "model.denoising.dn_number=4",
        "model.denoising.label_noise_ratio=0.3",
        "model.denoising.box_noise_scale=0.5",
    ),
    _c(
        "dn_deformable_detr",
        "5_levels",
        "test_dn_deformable_detr_tiny",
        f"{_MT}.num_feature_levels=5",
    ),
    # DINO: every two_stage_type, levels, head sharing, content, box update, label book
    _c("dino", "4scale", "test_dino_tiny", _8_HEADS),
    _c("dino", "5scale", "test_dino_tiny_5scale"),
    _c(
        "dino",
        "1scale_no_two_stage",
        "test_dino_tiny",
        f"{_MT}.num_feature_levels=1",
        f"{_MQ}.kind=anchors",
    ),
    _c(
        "dino",
        "separate_heads",
        "test_dino_tiny",
        f"{_MH}.share_decoder_class=false",
        f"{_MH}.share_decoder_box=false",
    ),
    _c(
        "dino",
        "shared_encoder_heads",
        "test_dino_tiny",
        f"{_MH}.share_encoder_class=true",
        f"{_MH}.share_encoder_box=true",
    ),
    _c(
        "dino",
        "selected_content_temperatures",
        "test_dino_tiny",
        f"{_MQ}.content=encoder",
        "model.position.temperature_h=10000",
        "model.position.temperature_w=30",
    ),
    _c(
        "dino",
        "detached_boxes_big_labelbook_gelu",
        "test_dino_tiny",
        f"{_MQ}.box_update=refine",
        "model.denoising.labelbook_size=40",
        f"{_MT}.activation=gelu",
    ),
)

# the first case of each code base (8 heads)
DEFAULT_CASES: dict[str, Case] = {}
for _case in CASES:
    DEFAULT_CASES.setdefault(_case.code_base, _case)


def case_params(cases: tuple[Case, ...] | list[Case] = CASES) -> list[Any]:
    """``pytest.param`` of every case, with its id."""
    import pytest

    return [pytest.param(c, id=c.id) for c in cases]


def family_of(cfg: Config) -> str:
    """Upstream family of a detrkit config (which repository builds it)."""
    m = cfg.model
    if m.queries.kind == "learned":
        return "detr"
    if m.queries.kind in ("reference_points", "two_stage"):
        return "deformable_detr"
    deformable = m.transformer.attention == "deformable"
    if m.queries.kind == "mixed" or m.denoising.kind == "cdn":
        return "dino"
    if m.denoising.kind == "dn":
        return "dn_deformable_detr" if deformable else "dn_dab_detr"
    return "dab_deformable_detr" if deformable else "dab_detr"


def case_config(case: Case) -> Config:
    """The detrkit config of ``case`` as the converter must reproduce it: the deformable
    attention backend ``auto``, a learned position encoding without the sine settings and,
    where queries are selected from encoder proposals, the official ranking of every token
    (``select_valid_proposals`` false)."""
    extra = [] if case.code_base in ("detr", "dab_detr") else [f"{_MT}.msda_backend=auto"]
    cfg = small_config(case.preset, *case.overrides, *extra)
    if cfg.model.position.kind == "learned":
        cfg.model.position = PositionConfig(kind="learned")
    if cfg.model.queries.kind in ("two_stage", "mixed"):
        cfg.model.queries.select_valid_proposals = False
    return cfg.validate()


def _common(cfg: Config) -> dict[str, Any]:
    m, t = cfg.model, cfg.model.transformer
    return {
        "backbone": m.backbone.name,
        "dilation": m.backbone.dilation,
        "position_embedding": m.position.kind,
        "hidden_dim": t.hidden_dim,
        "nheads": t.nheads,
        "enc_layers": t.enc_layers,
        "dec_layers": t.dec_layers,
        "dim_feedforward": t.dim_feedforward,
        "dropout": t.dropout,
        "num_queries": m.queries.num_queries,
        "aux_loss": m.aux_loss,
        "masks": False,
        "dataset_file": "coco",
        "lr_backbone": 1e-5,
    }


def _deformable(cfg: Config) -> dict[str, Any]:
    t = cfg.model.transformer
    return {
        "num_feature_levels": t.num_feature_levels,
        "enc_n_points": t.enc_n_points,
        "dec_n_points": t.dec_n_points,
    }


def _dn_detr(cfg: Config) -> dict[str, Any]:
    """DN-DETR's denoising arguments (``scalar`` groups, label / box noise)."""
    dn = cfg.model.denoising
    if dn.kind == "none":
        return {"use_dn": False}
    return {
        "use_dn": True,
        "scalar": dn.dn_number,
        "label_noise_scale": dn.label_noise_ratio,
        "box_noise_scale": dn.box_noise_scale,
    }


# DINO options at the values of every published config/DINO/*.py (other values build models
# that detrkit does not have)
DINO_FIXED_OPTIONS: dict[str, Any] = {
    "two_stage_add_query_num": 0,
    "two_stage_pat_embed": 0,
    "two_stage_learn_wh": False,
    "two_stage_keep_all_tokens": False,
    "dec_layer_number": None,
    "decoder_sa_type": "sa",
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "use_deformable_box_attn": False,
    "add_channel_attention": False,
    "unic_layers": 0,
    "pre_norm": False,
    "num_patterns": 0,
    "fix_refpoints_hw": -1,
    "query_dim": 4,
}


def official_args(cfg: Config) -> dict[str, Any]:
    """The upstream arguments of the model ``cfg`` describes (argument names of the official
    ``main.py`` / DINO config files)."""
    m, t, q, h = cfg.model, cfg.model.transformer, cfg.model.queries, cfg.model.heads
    family = family_of(cfg)
    args = _common(cfg)
    if family == "detr":
        args.update(pre_norm=t.pre_norm, num_classes_override=m.num_classes)
    elif family == "deformable_detr":
        args.update(
            **_deformable(cfg),
            with_box_refine=q.box_update == "refine",
            two_stage=q.kind == "two_stage",
            num_classes_override=m.num_classes,
        )
    elif family in ("dab_detr", "dn_dab_detr"):
        args.update(
            **_dn_detr(cfg),
            modelname=family,
            transformer_activation=t.activation,
            num_patterns=q.num_patterns,
            random_refpoints_xy=q.random_refpoints_xy,
            pe_temperatureH=m.position.temperature_h,
            pe_temperatureW=m.position.temperature_w,
            pre_norm=False,
            num_select=cfg.postprocess.num_select,
            num_classes_override=m.num_classes,
        )
    elif family in ("dab_deformable_detr", "dn_deformable_detr"):
        args.update(
            **_deformable(cfg),
            **_dn_detr(cfg),
            two_stage=False,
            modelname="dab_deformable_detr"
            if family == "dab_deformable_detr"
            else "dn_dab_deformable_detr",
            num_patterns=q.num_patterns,
            random_refpoints_xy=q.random_refpoints_xy,
            transformer_activation="relu",
            num_classes_override=m.num_classes,
        )
    else:  # DINO: config/DINO/DINO_*.py names
        dn = m.denoising
        mixed = q.kind == "mixed"
        args.update(
            **_deformable(cfg),
            modelname="dino",
            num_classes=m.num_classes,
            return_interm_indices=[level - 1 for level in backbone_levels(cfg)],
            two_stage_type="standard" if mixed else "no",
            embed_init_tgt=q.content == "learned",
            use_detached_boxes_dec_out=q.box_update == "refine",
            dec_pred_class_embed_share=h.share_decoder_class,
            dec_pred_bbox_embed_share=h.share_decoder_box,
            two_stage_class_embed_share=h.share_encoder_class,
            two_stage_bbox_embed_share=h.share_encoder_box,
            use_dn=True,
            dn_number=dn.dn_number,
            dn_label_noise_ratio=dn.label_noise_ratio,
            dn_box_noise_scale=dn.box_noise_scale,
            dn_labelbook_size=dn.labelbook_size or m.num_classes,
            num_select=cfg.postprocess.num_select,
            transformer_activation=t.activation,
            pe_temperatureH=m.position.temperature_h,
            pe_temperatureW=m.position.temperature_w,
            random_refpoints_xy=q.random_refpoints_xy,
            **DINO_FIXED_OPTIONS,
        )
    return args


def not_in_weights(cfg: Config) -> tuple[str, ...]:
    """The upstream arguments of ``cfg``'s model that no weight reveals (everything else must be
    inferred from the state dict): the head count, DC5, dropout, auxiliary outputs, the
    denoising noise, fixed random anchors, the activation where it has no weights, the sine
    temperatures, post-processing, and the query count where no query embedding has one row
    per query."""
    family = family_of(cfg)
    q = cfg.model.queries
    keys = ["nheads", "dilation", "dropout", "aux_loss"]
    if family == "deformable_detr" and q.kind == "two_stage":
        keys.append("num_queries")
    if family in ("dab_detr", "dn_dab_detr"):
        keys += [
            "num_select",
            "scalar",
            "label_noise_scale",
            "box_noise_scale",
            "random_refpoints_xy",
            "pe_temperatureH",
            "pe_temperatureW",
        ]
        if cfg.model.transformer.activation != "prelu":  # PReLU has weights
            keys.append("transformer_activation")
    if family in ("dab_deformable_detr", "dn_deformable_detr"):
        keys += ["scalar", "label_noise_scale", "box_noise_scale", "random_refpoints_xy"]
    if family == "dino":
        keys += [
            "num_select",
            "use_detached_boxes_dec_out",
            "dn_number",
            "dn_label_noise_ratio",
            "dn_box_noise_scale",
            "random_refpoints_xy",
            "transformer_activation",
            "pe_temperatureH",
            "pe_temperatureW",
        ]
        if q.kind == "mixed" and q.content != "learned":
            keys.append("num_queries")
    return tuple(keys)


def perturbed_model(cfg: Config, seed: int = 0) -> DetectionModel:
    """``build_model(cfg)`` in eval mode with every floating tensor after the backbone moved
    off its initialisation ("trained" weights: heads that start as copies differ, no zero
    layers; the backbone, renamed by one prefix rule, keeps its random initialisation)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not key.startswith("backbone."):
                value.add_(0.05 * torch.randn_like(value))
    return model


def model_dict(cfg: Config) -> dict[str, Any]:
    """``cfg.model`` as plain data (for equality with a readable diff)."""
    return to_dict(cfg.model)
